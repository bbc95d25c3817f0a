//! touchpoint: a daemon that reaches out to customers at the right moments.
//!
//! The flow of one message, module by module: [`rules`] say what to send and when;
//! [`plan`] turns rules plus customers and events into `messages` rows; [`dispatch`] claims
//! due rows, re-checks them, [`render`]s them and hands them to a [`transport`]; [`store`]
//! keeps everything in SQLite or PostgreSQL; [`http`] serves health and metrics, [`ingest`] the
//! API applications push customers and events to, and [`web`] the owner's page; [`daemon`]
//! runs it all under one cancellation token.
//!
//! The modules form layers, each importing only its own and those below (`tests/layers.rs`
//! keeps it so): foundation ([`diag`], [`duration`], [`calendar`], [`settings`], ...),
//! subsystems ([`rules`], [`store`], [`transport`], [`metrics`], ...), the engine ([`plan`],
//! [`dispatch`], [`render`], [`sources`], [`playbook`], [`runtime`], ...), the surfaces
//! ([`http`], [`ingest`], [`web`]) and the wiring ([`config`], [`commands`], [`daemon`],
//! [`cli`]).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod bounce;
pub mod calendar;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod diag;
pub mod digest;
pub mod dispatch;
pub mod duration;
pub mod experience;
pub mod http;
pub mod import;
pub mod ingest;
pub mod links;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod plan;
pub mod playbook;
pub mod query;
pub mod render;
pub mod replies;
pub mod rules;
pub mod runtime;
pub mod settings;
pub mod sources;
pub mod store;
pub mod transport;
pub mod web;

pub use daemon::{Listeners, run};

//! touchpoint: a daemon that reaches out to customers at the right moments.
//!
//! The flow of one message, module by module: [`rules`] say what to send and when;
//! [`plan`] turns rules plus customers and events into `messages` rows; [`dispatch`] claims
//! due rows, re-checks them, [`render`]s them and hands them to a [`transport`]; [`store`]
//! keeps everything in SQLite or PostgreSQL; [`http`] serves health and metrics, [`ingest`] the
//! API applications push customers and events to, and [`web`] the owner's page; [`daemon`]
//! runs it all under one cancellation token.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod bounce;
pub mod calendar;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod diag;
pub mod dispatch;
pub mod http;
pub mod import;
pub mod ingest;
pub mod links;
pub mod listener;
pub mod notify;
pub mod output;
pub mod plan;
pub mod playbook;
pub mod query;
pub mod render;
pub mod rules;
pub mod sources;
pub mod store;
pub mod transport;
pub mod web;

pub use daemon::{Listeners, run};

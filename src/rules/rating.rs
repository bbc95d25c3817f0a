//! `rating = { scale = "csat" | "nps", question = "..." }`: a rule whose messages ask the
//! customer how it went, with one signed link per score.

/// The scale of a rating: CSAT 1–5 or NPS 0–10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatingScale {
    Csat,
    Nps,
}

impl RatingScale {
    /// The name written in rules and stored with each rating (`"csat"`, `"nps"`).
    pub fn as_str(self) -> &'static str {
        match self {
            RatingScale::Csat => "csat",
            RatingScale::Nps => "nps",
        }
    }

    pub fn parse(name: &str) -> Option<RatingScale> {
        match name {
            "csat" => Some(RatingScale::Csat),
            "nps" => Some(RatingScale::Nps),
            _ => None,
        }
    }

    pub fn lowest(self) -> u8 {
        match self {
            RatingScale::Csat => 1,
            RatingScale::Nps => 0,
        }
    }

    pub fn highest(self) -> u8 {
        match self {
            RatingScale::Csat => 5,
            RatingScale::Nps => 10,
        }
    }

    /// Every score of the scale, lowest first.
    pub fn scores(self) -> std::ops::RangeInclusive<u8> {
        self.lowest()..=self.highest()
    }

    pub fn contains(self, score: i64) -> bool {
        (i64::from(self.lowest())..=i64::from(self.highest())).contains(&score)
    }
}

/// What a rule's `rating` asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatingRequest {
    pub scale: RatingScale,
    /// Shown above the scores; `None`: the partial's default ("How did we do?").
    pub question: Option<String>,
}

impl RatingRequest {
    /// The question shown with the scores.
    pub fn question(&self) -> &str {
        self.question.as_deref().unwrap_or("How did we do?")
    }
}

//! The model catalogue: which models exist, who serves them, their tier and price
//! (`config/models.toml`, replaceable with `--models FILE`; format in docs/catalogue.md).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The catalogue shipped in the binary.
pub const DEFAULT_CATALOGUE: &str = include_str!("../../../../config/models.toml");

/// Which monthly quota a model call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Premium,
    Normal,
    Eco,
}

impl Tier {
    /// The quota counter a model of this tier draws on.
    pub fn counter(self) -> crate::quota::Counter {
        use crate::quota::Counter;
        match self {
            Tier::Premium => Counter::Premium,
            Tier::Normal => Counter::Normal,
            Tier::Eco => Counter::Eco,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Premium => "premium",
            Tier::Normal => "normal",
            Tier::Eco => "eco",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Gemini,
    OpenaiCompatible,
    /// A provider CLI (Claude Code, Codex CLI, Gemini CLI) run in the user's runtime container
    /// with the user's own subscription (docs/cli-backends.md, "In runtime containers").
    Cli,
}

/// A price in millionths of a US dollar per million tokens, parsed from a decimal string so
/// that costs are exact (no floating point anywhere in billing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Price(pub u64);

/// A cost in picodollars (10^-12 USD): tokens × micro-USD per million tokens, exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cost(pub u128);

impl Price {
    pub fn cost(self, tokens: u64) -> Cost {
        Cost(u128::from(tokens) * u128::from(self.0))
    }
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, other: Cost) -> Cost {
        Cost(self.0 + other.0)
    }
}

impl fmt::Display for Cost {
    /// A plain decimal in USD with no trailing zeros (`0.000375`), as NUMERIC accepts it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1_000_000_000_000;
        let frac = self.0 % 1_000_000_000_000;
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{frac:012}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl Serialize for Cost {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = format!("{:07}", self.0);
        let (whole, frac) = digits.split_at(digits.len() - 6);
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            write!(f, "{whole}")
        } else {
            write!(f, "{whole}.{frac}")
        }
    }
}

impl Serialize for Price {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_price(&text).map_err(serde::de::Error::custom)
    }
}

fn parse_price(text: &str) -> std::result::Result<Price, String> {
    let bad = || {
        format!(
            "`{text}` is not a price: expected a decimal string like \"2.50\" (at most 6 decimals)"
        )
    };
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 6 || whole.len() > 9 {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let frac: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    Ok(Price(whole * 1_000_000 + frac))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    pub kind: ProviderKind,
    /// The API root (`kind = "cli"`: none).
    #[serde(default)]
    pub base_url: String,
    #[serde(default, skip_serializing)]
    pub api_key_env: Option<String>,
    #[serde(default = "yes")]
    pub streaming: bool,
    /// `kind = "cli"`: which CLI (`claude`, `codex`, `gemini`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cli: Option<String>,
    /// `kind = "cli"`: the executable inside the container (default: the CLI's name, looked up
    /// on the container's `PATH`). Its file name must be the CLI's name: only that program
    /// gets the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub id: String,
    pub provider: String,
    pub tier: Tier,
    pub input_price: Price,
    pub output_price: Price,
    pub context_window: u32,
    /// The model name sent upstream, when it differs from `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

impl ModelSpec {
    pub fn upstream_name(&self) -> &str {
        self.upstream.as_deref().unwrap_or(&self.id)
    }

    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> Cost {
        self.input_price.cost(input_tokens) + self.output_price.cost(output_tokens)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub providers: BTreeMap<String, ProviderSpec>,
    pub models: Vec<ModelSpec>,
}

impl Catalogue {
    /// The shipped catalogue, or the operator's file.
    pub fn load(path: Option<&Path>) -> Result<Catalogue> {
        match path {
            None => Catalogue::parse(DEFAULT_CATALOGUE),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::Internal(format!(
                        "cannot read the model catalogue {}: {e}",
                        path.display()
                    ))
                })?;
                Catalogue::parse(&text)
                    .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))
            }
        }
    }

    pub fn parse(text: &str) -> Result<Catalogue> {
        let catalogue: Catalogue = toml::from_str(text)
            .map_err(|e| Error::Internal(format!("invalid model catalogue: {e}")))?;
        catalogue.validate()?;
        Ok(catalogue)
    }

    fn validate(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for model in &self.models {
            if model.id.is_empty() || model.id.len() > 200 {
                return Err(Error::Internal(
                    "a model id must be 1 to 200 characters".into(),
                ));
            }
            if !seen.insert(model.id.as_str()) {
                return Err(Error::Internal(format!(
                    "model `{}` is listed twice",
                    model.id
                )));
            }
            if !self.providers.contains_key(&model.provider) {
                return Err(Error::Internal(format!(
                    "model `{}` names provider `{}`, which is not in [providers]",
                    model.id, model.provider
                )));
            }
        }
        for (name, provider) in &self.providers {
            if provider.kind == ProviderKind::Cli {
                let cli = provider.cli.as_deref().unwrap_or("");
                let Some(kind) = super::cli::CliKind::parse(cli).filter(|k| k.command() == cli)
                else {
                    return Err(Error::Internal(format!(
                        "provider `{name}`: kind \"cli\" needs cli = \"claude\", \"codex\" or \"gemini\""
                    )));
                };
                let program = provider.program.as_deref().unwrap_or(kind.command());
                if Path::new(program).file_name().and_then(|n| n.to_str()) != Some(kind.command()) {
                    return Err(Error::Internal(format!(
                        "provider `{name}`: the file name of `program` must be `{}`",
                        kind.command()
                    )));
                }
                continue;
            }
            if provider.cli.is_some() || provider.program.is_some() {
                return Err(Error::Internal(format!(
                    "provider `{name}`: `cli` and `program` are for kind \"cli\" only"
                )));
            }
            if !(provider.base_url.starts_with("http://")
                || provider.base_url.starts_with("https://"))
            {
                return Err(Error::Internal(format!(
                    "provider `{name}`: base_url must start with http:// or https://"
                )));
            }
        }
        Ok(())
    }

    pub fn model(&self, id: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_catalogue_is_valid_and_covers_every_tier() {
        let catalogue = Catalogue::parse(DEFAULT_CATALOGUE).unwrap();
        for tier in [Tier::Premium, Tier::Normal, Tier::Eco] {
            assert!(catalogue.models.iter().any(|m| m.tier == tier), "{tier:?}");
        }
    }

    #[test]
    fn prices_are_exact_decimals() {
        assert_eq!(parse_price("2.50").unwrap(), Price(2_500_000));
        assert_eq!(parse_price("0.075").unwrap(), Price(75_000));
        assert_eq!(parse_price("15").unwrap(), Price(15_000_000));
        for bad in ["", ".5", "1.2345678", "-1", "1e3", "abc", "1.2.3"] {
            assert!(parse_price(bad).is_err(), "{bad}");
        }
        assert_eq!(Price(2_500_000).to_string(), "2.5");
        assert_eq!(Price(75_000).to_string(), "0.075");
        // 1,234 input tokens at $2.50/M + 567 output at $10/M = 0.003085 + 0.00567
        let model = ModelSpec {
            id: "m".into(),
            provider: "p".into(),
            tier: Tier::Premium,
            input_price: Price(2_500_000),
            output_price: Price(10_000_000),
            context_window: 1,
            upstream: None,
        };
        assert_eq!(model.cost(1234, 567).to_string(), "0.008755");
        assert_eq!(Cost(0).to_string(), "0");
        assert_eq!(Price(75_000).cost(1).to_string(), "0.000000075");
    }

    #[test]
    fn invalid_catalogues_say_what_is_wrong() {
        let unknown_provider = r#"
            providers = {}
            [[models]]
            id = "x"
            provider = "nope"
            tier = "eco"
            input_price = "1"
            output_price = "1"
            context_window = 1
        "#;
        let err = Catalogue::parse(unknown_provider).unwrap_err().to_string();
        assert!(err.contains("provider `nope`"), "{err}");
        let bad_price = DEFAULT_CATALOGUE.replacen("\"2.00\"", "\"two\"", 1);
        let err = Catalogue::parse(&bad_price).unwrap_err().to_string();
        assert!(err.contains("not a price"), "{err}");
        let bad_tier = DEFAULT_CATALOGUE.replacen("tier = \"premium\"", "tier = \"gold\"", 1);
        assert!(Catalogue::parse(&bad_tier).is_err());
    }
}

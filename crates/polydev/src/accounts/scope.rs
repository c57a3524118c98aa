//! Token scopes: what a `pd_` token may do (docs/api.md#scopes). The token most likely to leak
//! is the one in an IDE's MCP configuration, so that one (`mcp`) can ask for perspectives and
//! read and write chat, but cannot mint or revoke tokens, change key material or take
//! credentials; those need an `account` token.

use serde::{Deserialize, Serialize};
use sqlx::Postgres;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueRef};

/// A token's scope. `Account` includes everything `Mcp` may do.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// MCP tools, perspectives, reads of usage and settings, chat, envelope migration writes.
    #[default]
    Mcp,
    /// Everything: also tokens, settings writes, zero-knowledge key material, credentials.
    Account,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Mcp => "mcp",
            Scope::Account => "account",
        }
    }

    /// True when a token of this scope may do what `needed` allows.
    pub fn includes(self, needed: Scope) -> bool {
        match self {
            Scope::Account => true,
            Scope::Mcp => needed == Scope::Mcp,
        }
    }

    /// A stored value. Anything but `account` (a legacy row, a value written by hand) reads as
    /// the narrower `mcp`: an unknown value never grants more.
    pub fn from_stored(value: &str) -> Scope {
        if value == "account" {
            Scope::Account
        } else {
            Scope::Mcp
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Read from the `TEXT` column `mcp_user_tokens.scope` (`"scope: Scope"` in the query macros).
impl sqlx::Type<Postgres> for Scope {
    fn type_info() -> PgTypeInfo {
        <&str as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for Scope {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Scope::from_stored(
            <&str as sqlx::Decode<Postgres>>::decode(value)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_includes_mcp_and_unknown_values_are_the_narrow_scope() {
        assert!(Scope::Account.includes(Scope::Mcp));
        assert!(Scope::Account.includes(Scope::Account));
        assert!(Scope::Mcp.includes(Scope::Mcp));
        assert!(!Scope::Mcp.includes(Scope::Account));
        assert_eq!(Scope::from_stored("account"), Scope::Account);
        for other in ["mcp", "", "Account", "admin"] {
            assert_eq!(Scope::from_stored(other), Scope::Mcp, "{other}");
        }
        assert_eq!(Scope::default(), Scope::Mcp);
    }
}

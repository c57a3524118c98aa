//! What a provider's error text may show a user: providers put organisation and project ids,
//! request ids and fragments of API keys in their messages ("Incorrect API key provided:
//! sk-proj-abc***xyz", "in organization org-…"). Those are ours or the operator's, never the
//! caller's, so they are masked, and the text is cut short.

/// Longest provider text passed on, in characters.
pub const MAX_DETAIL_CHARS: usize = 200;

/// Prefixes of keys and account identifiers the providers use.
const SECRET_PREFIXES: &[&str] = &[
    "sk-", "sk_", "pk-", "rk-", "org-", "org_", "proj_", "proj-", "key-", "aiza", "ya29.", "sess-",
    "req_", "user-",
];

/// `text` with every word that looks like a key or an account identifier replaced by
/// `[redacted]`, cut to [`MAX_DETAIL_CHARS`].
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_DETAIL_CHARS + 16));
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if !word.is_empty() {
            out.push_str(if is_secret(word) { "[redacted]" } else { word });
            word.clear();
        }
    };
    for c in text.chars() {
        if c.is_alphanumeric() || matches!(c, '_' | '-' | '.') {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            // Runs of control characters and newlines read as one space.
            if c.is_control() || c.is_whitespace() {
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            } else {
                out.push(c);
            }
        }
    }
    flush(&mut word, &mut out);
    let out = out.trim();
    if out.chars().count() > MAX_DETAIL_CHARS {
        let cut: String = out.chars().take(MAX_DETAIL_CHARS).collect();
        format!("{cut}…")
    } else {
        out.to_string()
    }
}

fn is_secret(word: &str) -> bool {
    let word = word.trim_end_matches('.');
    let lower = word.to_ascii_lowercase();
    let prefixed = SECRET_PREFIXES
        .iter()
        .any(|p| lower.starts_with(p) && word.len() >= p.len() + 4);
    // Long opaque tokens: ids, keys, UUIDs (letters and digits mixed).
    let opaque = word.len() >= 20
        && word.chars().any(|c| c.is_ascii_digit())
        && word.chars().any(|c| c.is_ascii_alphabetic());
    prefixed || opaque
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_account_ids_are_masked_and_words_kept() {
        let openai = "Incorrect API key provided: sk-proj-AbC123dEf***************************wxYz. You can find your API key at https://platform.openai.com/account/api-keys.";
        let shown = redact(openai);
        assert!(!shown.contains("AbC123"), "{shown}");
        assert!(
            shown.starts_with("Incorrect API key provided: [redacted]"),
            "{shown}"
        );
        assert!(shown.contains("platform.openai.com"), "{shown}");

        let limit = "Rate limit reached for gpt-4o in organization org-Xy12AbCdEfGh34 on tokens per min (TPM): Limit 30000, Used 29990.";
        let shown = redact(limit);
        assert!(!shown.contains("Xy12"), "{shown}");
        assert!(
            shown.contains("gpt-4o") && shown.contains("Limit 30000"),
            "{shown}"
        );

        let anthropic = "This request would exceed your organization's (5c1b7e0e-3f3a-4d4e-9b2a-0f6a1c2d3e4f) rate limit; request_id req_011CVbQkA9xyz";
        let shown = redact(anthropic);
        assert!(
            !shown.contains("5c1b7e0e") && !shown.contains("011CV"),
            "{shown}"
        );

        let google =
            "API key not valid. Please pass a valid API key. key=AIzaSyD-abcdefghijklmnop1234";
        assert!(!redact(google).contains("AIzaSy"));
    }

    #[test]
    fn long_text_is_cut_and_whitespace_folded() {
        let html = format!("<html>\n\n<body>{}</body></html>", "x ".repeat(500));
        let shown = redact(&html);
        assert!(shown.chars().count() <= MAX_DETAIL_CHARS + 1);
        assert!(shown.ends_with('…'));
        assert!(!shown.contains('\n'));
        assert_eq!(redact("model not found"), "model not found");
    }
}

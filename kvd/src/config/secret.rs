//! Secrets in the configuration (S3 keys, Redis URLs that may carry a password) and the
//! wording of configuration errors, so that neither a log line, `{:?}`, `--check-config`
//! nor a parse error of any source (file, `KVD_*` variable, `--set`) ever prints one.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// A value that must never be printed: `Debug`, `Display` and serialization show
/// `<redacted>` (or nothing when empty); [`expose`](Secret::expose) is the one way in.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The value itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is empty (unset).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            "<redacted>"
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(self.shown())
    }
}

/// A URL that may carry a password (`redis://:pw@host:6379`): `Debug`, `Display` and
/// serialization show it without its user info; [`expose`](SecretUrl::expose) is the one
/// way to the whole URL.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps `url`.
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The whole URL, for the client that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its user info.
    pub fn shown(&self) -> String {
        without_user_info(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&self.shown())
    }
}

/// A URL without its user info (`scheme://host...`), for logs and errors.
pub fn without_user_info(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{host}")
}

/// Keys whose values are secrets: their values are never quoted in an error.
pub const SECRET_KEYS: [&str; 2] = ["s3.secret_access_key", "index.redis_urls"];

/// `section.key` of the TOML line holding byte `at` of `text` (a key at the start of the
/// line, under the last `[section]` header above it), if the line has one.
pub fn key_at(text: &str, at: usize) -> Option<String> {
    let before = &text[..at.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let section = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match section {
        Some(s) if !key.contains('.') => format!("{s}.{key}"),
        _ => key.to_owned(),
    })
}

/// 1-based line number of byte `at` of `text`.
pub fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// `message` with every quoted or backquoted part (serde's way of echoing a value) cut out.
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push_str("<redacted>");
                open = None;
            }
            Some(_) => {}
            None if c == '`' || c == '"' => open = Some(c),
            None => out.push(c),
        }
    }
    out
}

/// The parser's message about `text` (never its snippet of the offending line) naming the
/// key, with any echoed value cut out when the key is a secret or cannot be told.
pub fn describe(e: &toml::de::Error, text: &str) -> (Option<String>, String) {
    let key = e.span().and_then(|s| key_at(text, s.start));
    let secret = key
        .as_deref()
        .is_none_or(|k| SECRET_KEYS.iter().any(|s| k == *s || k.ends_with(s)));
    let msg = e.message().trim();
    let msg = if secret {
        without_values(msg)
    } else {
        msg.to_owned()
    };
    (key, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("271828182845");
        assert_eq!(format!("{s} {s:?}"), "<redacted> \"<redacted>\"");
        assert_eq!(
            toml::to_string(
                &[("k", &s)]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>()
            )
            .unwrap(),
            "k = \"<redacted>\"\n"
        );
        assert_eq!(s.expose(), "271828182845");
        assert_eq!(Secret::default().to_string(), "");
    }

    #[test]
    fn urls_print_without_their_user_info() {
        let u = SecretUrl::new("redis://:s3cret@10.0.0.1:6379/0");
        assert_eq!(
            format!("{u} {u:?}"),
            "redis://10.0.0.1:6379/0 \"redis://10.0.0.1:6379/0\""
        );
        assert_eq!(without_user_info("rediss://user:pw@h:1"), "rediss://h:1");
        assert_eq!(without_user_info("redis://h:1"), "redis://h:1");
        assert_eq!(u.expose(), "redis://:s3cret@10.0.0.1:6379/0");
    }

    #[test]
    fn keys_are_found_under_their_section() {
        let t = "top = 1\n[s3]\nbucket = \"b\"\nsecret_access_key = 42\n";
        assert_eq!(
            key_at(t, t.find("42").unwrap()).as_deref(),
            Some("s3.secret_access_key")
        );
        assert_eq!(key_at(t, 2).as_deref(), Some("top"));
        assert_eq!(line_of(t, t.find("42").unwrap()), 4);
    }

    #[test]
    fn values_are_cut_out_of_messages() {
        assert_eq!(
            without_values("invalid type: integer `271828182845`, expected a string \"x\""),
            "invalid type: integer <redacted>, expected a string <redacted>"
        );
    }
}

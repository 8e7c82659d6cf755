//! `RelPath`: a path from a request or token, parsed once. Only `RelPath` reaches the backends,
//! which resolve it beneath the vfolder root (symlinks included) with `openat2(RESOLVE_BENEATH)`.

use std::fmt;

/// What a path climbing out of its vfolder is refused with; `api::extract` recognises it to
/// answer Backend.AI's InvalidSubpathError.
pub const ESCAPES: &str = "path escapes the vfolder";

/// Linux NAME_MAX and PATH_MAX.
pub const NAME_MAX: usize = 255;
pub const PATH_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("expected relative path but the value is absolute")]
    Absolute,
    /// `..` climbing above the vfolder root (`..` that stays inside is resolved).
    #[error("{ESCAPES}")]
    Escapes,
    #[error("NUL bytes are not allowed in paths")]
    Nul,
    #[error("path is longer than {PATH_MAX} bytes")]
    TooLong,
    #[error("a path component is longer than {NAME_MAX} bytes")]
    NameTooLong,
    #[error("must be a single name without '/'")]
    NotAName,
    #[error("the vfolder root cannot be used here")]
    Root,
}

/// A normalized relative path: no leading '/', no '..', no NUL, no empty or '.' components.
/// The empty path is the vfolder root. `..` is resolved lexically as the Python proxy's
/// clients expect (`a/../b` is `b`); the backends then resolve the result beneath the vfolder
/// root with the kernel, so a symlinked `a` cannot make `a/..` mean anything else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelPath(String);

impl RelPath {
    pub fn root() -> Self {
        RelPath(String::new())
    }

    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.contains('\0') {
            return Err(PathError::Nul);
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute);
        }
        if s.len() > PATH_MAX {
            return Err(PathError::TooLong);
        }
        let mut parts = Vec::new();
        for c in s.split('/') {
            match c {
                "" | "." => continue,
                ".." => {
                    parts.pop().ok_or(PathError::Escapes)?;
                }
                c if c.len() > NAME_MAX => return Err(PathError::NameTooLong),
                c => parts.push(c),
            }
        }
        Ok(RelPath(parts.join("/")))
    }

    /// A single path component (a new name for rename, a mount name).
    pub fn parse_name(s: &str) -> Result<String, PathError> {
        if s.contains('/') {
            return Err(PathError::NotAName);
        }
        let p = RelPath::parse(s)?;
        if p.is_root() {
            return Err(PathError::Root);
        }
        Ok(p.0)
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        if self.0.is_empty() { "." } else { &self.0 }
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// Splits off the last component; None for the root.
    pub fn split_last(&self) -> Option<(RelPath, &str)> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rsplit_once('/') {
            Some((parent, name)) => (RelPath(parent.to_string()), name),
            None => (RelPath::root(), self.0.as_str()),
        })
    }

    pub fn file_name(&self) -> Option<&str> {
        self.split_last().map(|(_, n)| n)
    }

    pub fn join(&self, other: &RelPath) -> RelPath {
        match (self.is_root(), other.is_root()) {
            (true, _) => other.clone(),
            (_, true) => self.clone(),
            _ => RelPath(format!("{}/{}", self.0, other.0)),
        }
    }

    pub fn join_name(&self, name: &str) -> RelPath {
        self.join(&RelPath(name.to_string()))
    }

    /// Whether `self` is `other` or lies inside it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        RelPath::parse(&s).map_err(|e| serde::de::Error::custom(format!("{e}: {s}")))
    }
}

/// OpenAPI: a path relative to the vfolder root.
impl utoipa::PartialSchema for RelPath {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "A path relative to the vfolder root (\".\" is the root); never absolute, never ..",
            ))
            .examples(["data/train.csv"])
            .into()
    }
}
impl utoipa::ToSchema for RelPath {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(RelPath::parse("a//b/./c/").unwrap().as_str(), "a/b/c");
        assert!(RelPath::parse(".").unwrap().is_root());
        assert!(RelPath::parse("").unwrap().is_root());
        assert_eq!(RelPath::parse("..a/b..").unwrap().as_str(), "..a/b..");
        assert_eq!(RelPath::parse("a/../b").unwrap().as_str(), "b");
        assert!(RelPath::parse("a/b/../..").unwrap().is_root());
    }

    #[test]
    fn rejects_hostile_paths() {
        assert_eq!(RelPath::parse("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(RelPath::parse("a/../../b"), Err(PathError::Escapes));
        assert_eq!(RelPath::parse(".."), Err(PathError::Escapes));
        assert_eq!(RelPath::parse("a\0b"), Err(PathError::Nul));
        assert_eq!(
            RelPath::parse(&"x".repeat(256)),
            Err(PathError::NameTooLong)
        );
        assert_eq!(RelPath::parse(&"a/".repeat(2049)), Err(PathError::TooLong));
        assert_eq!(RelPath::parse_name("a/b"), Err(PathError::NotAName));
        assert_eq!(RelPath::parse_name(".."), Err(PathError::Escapes));
        assert_eq!(RelPath::parse_name("."), Err(PathError::Root));
    }

    #[test]
    fn splits_and_joins() {
        let p = RelPath::parse("a/b/c").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!((parent.as_str(), name), ("a/b", "c"));
        assert_eq!(RelPath::root().join(&p), p);
        assert!(p.starts_with(&RelPath::parse("a/b").unwrap()));
        assert!(
            !RelPath::parse("a/bc")
                .unwrap()
                .starts_with(&RelPath::parse("a/b").unwrap())
        );
    }
}

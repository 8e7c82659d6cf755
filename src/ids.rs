//! Backend.AI identifiers, parsed strictly: quota scope ids (`user:<uuid>`, `project:<uuid>`) and
//! vfolder ids (`<qsid>/<32 hex>`, or a legacy bare folder id).

use std::fmt;
use std::path::PathBuf;

use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("quota scope id must be \"user:<uuid>\" or \"project:<uuid>\", got {0:?}")]
    QuotaScope(String),
    #[error("vfolder id must be \"<quota scope id>/<32 hex digits>\", got {0:?}")]
    VFolder(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuotaScopeKind {
    User,
    Project,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaScopeId {
    pub kind: QuotaScopeKind,
    pub id: Uuid,
}

/// Only the two forms Backend.AI emits: dashed (any case) or 32 plain hex digits.
fn parse_uuid(s: &str) -> Option<Uuid> {
    let ok_shape = match s.len() {
        32 => s.bytes().all(|b| b.is_ascii_hexdigit()),
        36 => s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        }),
        _ => false,
    };
    ok_shape.then(|| Uuid::parse_str(s).ok()).flatten()
}

impl QuotaScopeId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let err = || IdError::QuotaScope(s.to_string());
        let (kind, id) = s.split_once(':').ok_or_else(err)?;
        let kind = match kind {
            "user" => QuotaScopeKind::User,
            "project" => QuotaScopeKind::Project,
            _ => return Err(err()),
        };
        Ok(QuotaScopeId {
            kind,
            id: parse_uuid(id).ok_or_else(err)?,
        })
    }

    /// The scope's directory name under the volume: the UUID as 32 hex digits, no type prefix
    /// (user and project scopes share one namespace, as in Backend.AI).
    pub fn dir_name(&self) -> String {
        self.id.simple().to_string()
    }
}

impl fmt::Display for QuotaScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            QuotaScopeKind::User => "user",
            QuotaScopeKind::Project => "project",
        };
        write!(f, "{kind}:{}", self.id.hyphenated())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VFolderId {
    /// None for legacy (pre-23.09) vfolders that live directly under the volume.
    pub quota_scope: Option<QuotaScopeId>,
    pub folder: Uuid,
}

impl VFolderId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let err = || IdError::VFolder(s.to_string());
        match s.split_once('/') {
            Some((qs, folder)) => Ok(VFolderId {
                quota_scope: Some(QuotaScopeId::parse(qs).map_err(|_| err())?),
                folder: parse_uuid(folder).ok_or_else(err)?,
            }),
            None => Ok(VFolderId {
                quota_scope: None,
                folder: parse_uuid(s).ok_or_else(err)?,
            }),
        }
    }

    /// `<qs-hex>/<aa>/<bb>/<rest>` (or `<aa>/<bb>/<rest>` for legacy ids), relative to the volume.
    pub fn rel_path(&self) -> PathBuf {
        let hex = self.folder.simple().to_string();
        let mut p = PathBuf::new();
        if let Some(qs) = &self.quota_scope {
            p.push(qs.dir_name());
        }
        p.push(&hex[0..2]);
        p.push(&hex[2..4]);
        p.push(&hex[4..]);
        p
    }
}

impl fmt::Display for VFolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.quota_scope {
            Some(qs) => write!(f, "{qs}/{}", self.folder.simple()),
            None => write!(f, "{}", self.folder.simple()),
        }
    }
}

/// Serialized as their string forms; deserializing validates with the same strict parsers, so a
/// bad id in a request body is reported under its field name.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$t>::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(QuotaScopeId);
serde_as_string!(VFolderId);

/// OpenAPI: ids are strings in their Backend.AI forms.
fn string_schema(
    description: &str,
    example: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .examples([example])
        .into()
}

impl utoipa::PartialSchema for QuotaScopeId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "A quota scope: user:<uuid> or project:<uuid>",
            "user:5ae8c1b2-7f0d-4d5e-9c3a-2b1e0f6a7d88",
        )
    }
}
impl utoipa::ToSchema for QuotaScopeId {}

impl utoipa::PartialSchema for VFolderId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "A vfolder: <quota scope>/<uuid as 32 hex digits>",
            "user:5ae8c1b2-7f0d-4d5e-9c3a-2b1e0f6a7d88/0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        )
    }
}
impl utoipa::ToSchema for VFolderId {}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "550e8400-e29b-41d4-a716-446655440000";

    #[test]
    fn quota_scope_ids() {
        let q = QuotaScopeId::parse(&format!("user:{U}")).unwrap();
        assert_eq!(q.to_string(), format!("user:{U}"));
        assert_eq!(q.dir_name(), "550e8400e29b41d4a716446655440000");
        assert!(QuotaScopeId::parse(&format!("project:{}", U.replace('-', ""))).is_ok());
        for bad in [
            format!("group:{U}"),
            format!("user:{{{U}}}"),
            format!("user:urn:uuid:{U}"),
            format!("user:{U}x"),
            "user:".into(),
            U.to_string(),
            format!("User:{U}"),
            format!(" user:{U}"),
        ] {
            assert!(QuotaScopeId::parse(&bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn vfolder_ids_and_layout() {
        let v = VFolderId::parse(&format!("user:{U}/0123456789abcdef0123456789abcdef")).unwrap();
        assert_eq!(
            v.rel_path(),
            PathBuf::from("550e8400e29b41d4a716446655440000/01/23/456789abcdef0123456789abcdef")
        );
        assert_eq!(
            v.to_string(),
            format!("user:{U}/0123456789abcdef0123456789abcdef")
        );
        let dashed =
            VFolderId::parse(&format!("user:{U}/01234567-89ab-cdef-0123-456789abcdef")).unwrap();
        assert_eq!(dashed, v);
        let legacy = VFolderId::parse("0123456789abcdef0123456789abcdef").unwrap();
        assert!(legacy.quota_scope.is_none());
        assert_eq!(
            legacy.rel_path(),
            PathBuf::from("01/23/456789abcdef0123456789abcdef")
        );
        for bad in [
            "",
            "/",
            "../../etc",
            "user:x/0123456789abcdef0123456789abcdef",
            &format!("user:{U}/../x"),
            &format!("user:{U}/0123456789abcdef0123456789abcdeg"),
            &format!("user:{U}/0123456789abcdef0123456789abcdef/extra"),
        ] {
            assert!(VFolderId::parse(bad).is_err(), "{bad} accepted");
        }
    }
}

//! The image service's domain types, free of wire and SQL types.

use std::collections::BTreeMap;

use time::OffsetDateTime;
use uuid::Uuid;

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),+];

            /// The name stored in Postgres and shown in messages.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Glance's image life cycle: queued -> saving -> active (or killed);
    /// active <-> deactivated.
    Status {
        Queued = "queued",
        Saving = "saving",
        Active = "active",
        Killed = "killed",
        Deactivated = "deactivated",
    }
);

text_enum!(DiskFormat {
    Raw = "raw",
    Qcow2 = "qcow2",
    Iso = "iso",
    Aki = "aki",
    Ari = "ari",
});

text_enum!(ContainerFormat {
    Bare = "bare",
    Ovf = "ovf",
});

text_enum!(Visibility {
    Private = "private",
    Shared = "shared",
    Community = "community",
    Public = "public",
});

text_enum!(MemberStatus {
    Pending = "pending",
    Accepted = "accepted",
    Rejected = "rejected",
});

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: Uuid,
    pub name: String,
    pub owner: String,
    pub status: Status,
    pub visibility: Visibility,
    pub disk_format: DiskFormat,
    pub container_format: ContainerFormat,
    pub min_disk: u32,
    pub min_ram: u32,
    pub protected: bool,
    pub properties: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub expected_size: Option<u64>,
    pub expected_sha256: String,
    pub size: Option<u64>,
    pub sha256: String,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// What `CreateImage` asks for, already validated.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub name: String,
    pub disk_format: DiskFormat,
    pub container_format: ContainerFormat,
    pub visibility: Visibility,
    pub min_disk: u32,
    pub min_ram: u32,
    pub protected: bool,
    pub properties: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub expected_size: Option<u64>,
    pub expected_sha256: String,
}

/// What `UpdateImage` changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ImageUpdate {
    pub name: Option<String>,
    pub set_properties: BTreeMap<String, String>,
    pub remove_properties: Vec<String>,
    pub tags: Option<Vec<String>>,
    pub visibility: Option<Visibility>,
    pub protected: Option<bool>,
    pub min_disk: Option<u32>,
    pub min_ram: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    CreatedAt,
    UpdatedAt,
    Name,
    Size,
    Status,
}

impl SortKey {
    /// The SQL expression sorted on (a whitelist: never user text).
    pub fn sql(self) -> &'static str {
        match self {
            SortKey::CreatedAt => "created_at",
            SortKey::UpdatedAt => "updated_at",
            SortKey::Name => "name",
            SortKey::Size => "COALESCE(size, -1)",
            SortKey::Status => "status",
        }
    }
}

/// `ListImages` filters, already validated.
#[derive(Debug, Clone)]
pub struct ListFilter {
    pub name: Option<String>,
    pub status: Option<Status>,
    pub visibility: Option<Visibility>,
    pub owner: Option<String>,
    pub tags: Vec<String>,
    pub properties: BTreeMap<String, String>,
    pub member_status: MemberStatus,
    pub sort_key: SortKey,
    pub ascending: bool,
    pub marker: Option<Uuid>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub image_id: Uuid,
    pub member: String,
    pub status: MemberStatus,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_images: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub project_id: String,
    pub limits: Limits,
    pub used_bytes: u64,
    pub used_images: u64,
}

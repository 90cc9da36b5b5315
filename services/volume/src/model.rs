//! The volume service's domain types, free of wire and SQL types.

use std::collections::BTreeMap;

use runtime::types::Name;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }

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
    /// Cinder's volume life cycle (see the README's status machine).
    VolumeStatus {
        Creating = "creating",
        Available = "available",
        Reserved = "reserved",
        Attaching = "attaching",
        InUse = "in-use",
        Detaching = "detaching",
        Extending = "extending",
        Deleting = "deleting",
        Error = "error",
        ErrorDeleting = "error_deleting",
    }
);

text_enum!(SnapshotStatus {
    Creating = "creating",
    Available = "available",
    Deleting = "deleting",
    Error = "error",
    ErrorDeleting = "error_deleting",
});

text_enum!(AttachmentStatus {
    Reserved = "reserved",
    Attaching = "attaching",
    Attached = "attached",
    Detaching = "detaching",
});

text_enum!(
    /// How a volume's bytes are laid out in its file.
    Format {
        Raw = "raw",
        Qcow2 = "qcow2",
    }
);

text_enum!(
    /// How a host reaches a volume's bytes.
    Transport {
        LocalFile = "local_file",
        Nbd = "nbd",
    }
);

pub const GIB: u64 = 1024 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub project_id: String,
    pub user_id: String,
    pub size_gb: u64,
    pub status: VolumeStatus,
    pub format: Format,
    pub bootable: bool,
    pub metadata: BTreeMap<String, String>,
    pub source_image_id: Option<Uuid>,
    pub source_snapshot_id: Option<Uuid>,
    pub attachment_id: Option<Uuid>,
    pub status_reason: String,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// Where a new volume's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Empty,
    Image(Uuid),
    Snapshot(Uuid),
}

/// What `CreateVolume` asks for, already validated.
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// `None`: the source's size.
    pub size_gb: Option<u64>,
    pub name: Option<Name>,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
    /// `None`: the configured default.
    pub format: Option<Format>,
    pub source: Source,
    pub bootable: Option<bool>,
    pub wait: bool,
}

#[derive(Debug, Clone, Default)]
pub struct VolumeUpdate {
    pub name: Option<Option<Name>>,
    pub description: Option<String>,
    pub bootable: Option<bool>,
    pub set_metadata: BTreeMap<String, String>,
    pub remove_metadata: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct VolumeFilter {
    pub name: Option<String>,
    pub status: Option<VolumeStatus>,
    pub bootable: Option<bool>,
    pub project_id: Option<String>,
    pub marker: Option<Uuid>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: Uuid,
    pub volume_id: Uuid,
    pub name: String,
    pub description: String,
    pub project_id: String,
    pub size_gb: u64,
    pub status: SnapshotStatus,
    pub metadata: BTreeMap<String, String>,
    pub status_reason: String,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub volume_id: Uuid,
    pub name: Option<Name>,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
    pub force: bool,
    pub wait: bool,
}

#[derive(Debug, Clone)]
pub struct SnapshotFilter {
    pub volume_id: Option<Uuid>,
    pub status: Option<SnapshotStatus>,
    pub marker: Option<Uuid>,
    pub limit: u32,
}

/// What a host says about itself when it connects a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connector {
    pub host: String,
    pub transports: Vec<Transport>,
}

/// How the host reaches the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum ConnectionInfo {
    LocalFile {
        path: String,
        format: Format,
    },
    /// Not offered yet: the shape a network export will take.
    Nbd {
        host: String,
        port: u16,
        export_name: String,
        format: Format,
        tls: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub id: Uuid,
    pub volume_id: Uuid,
    pub server_id: String,
    pub project_id: String,
    pub status: AttachmentStatus,
    pub connector: Option<Connector>,
    pub connection_info: Option<ConnectionInfo>,
    pub mountpoint: String,
    /// The host whose compute agent made it (`None`: a user directly).
    pub made_by_host: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl Attachment {
    /// On host `h`: its connector names `h`, or, still without a connector,
    /// the compute agent of `h` made it.
    pub fn on_host(&self, h: &str) -> bool {
        match &self.connector {
            Some(c) => c.host == h,
            None => self.made_by_host.as_deref() == Some(h),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub volumes: u64,
    pub gigabytes: u64,
    pub snapshots: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub volumes: u64,
    pub gigabytes: u64,
    pub snapshots: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub project_id: String,
    pub limits: Limits,
    pub used: Usage,
}

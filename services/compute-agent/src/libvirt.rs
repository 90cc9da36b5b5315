//! The hypervisor, through libvirt (the `virt` crate, isolated here). Every
//! call is blocking; the agent runs them on the blocking pool. Every
//! operation is idempotent: defining a domain that exists, destroying one
//! that is gone, resuming one that runs all succeed without change, so that
//! a repeated build step or a redelivered cast does no harm.
//!
//! The same code drives `test:///default` (libvirt's in-memory test driver,
//! for many simulated hosts on one machine) and `qemu:///system`. Where the
//! test driver lacks a feature the difference is handled here and named:
//! it refuses `VIR_DOMAIN_START_PAUSED`, so a domain is started and then
//! paused at once (the same end state, before any guest code could matter).

use std::sync::Arc;

use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

/// A libvirt failure, with libvirt's own message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtError(pub String);

impl std::fmt::Display for VirtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<virt::error::Error> for VirtError {
    fn from(e: virt::error::Error) -> Self {
        VirtError(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, VirtError>;

/// Nova's power states, as libvirt reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    NoState,
    Running,
    Paused,
    Shutdown,
    Crashed,
    Suspended,
}

impl Power {
    pub fn as_str(self) -> &'static str {
        match self {
            Power::NoState => "nostate",
            Power::Running => "running",
            Power::Paused => "paused",
            Power::Shutdown => "shutdown",
            Power::Crashed => "crashed",
            Power::Suspended => "suspended",
        }
    }
}

/// What a domain is made of.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub id: Uuid,
    pub vcpus: u32,
    pub ram_mb: u32,
    pub disk: String,
    pub config_drive: Option<String>,
}

/// Names of our domains: `cirrus-<server id>` (other domains are left alone).
pub fn domain_name(id: Uuid) -> String {
    format!("cirrus-{id}")
}

#[derive(Clone)]
pub struct Libvirt {
    conn: Arc<Connect>,
    domain_type: String,
    pub uri: String,
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl Libvirt {
    pub fn open(uri: &str, domain_type: &str) -> Result<Self> {
        // libvirt prints every error on stderr by default; ours are returned
        // (and an expected "no such domain" is not an error here at all).
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri))?;
        Ok(Self {
            conn: Arc::new(conn),
            domain_type: domain_type.to_string(),
            uri: uri.to_string(),
        })
    }

    /// (CPUs, memory in MiB) of the node.
    pub fn node(&self) -> Result<(u32, u64)> {
        let info = self.conn.node_info()?;
        Ok((info.cpus, info.memory / 1024))
    }

    fn lookup(&self, id: Uuid) -> Result<Option<Domain>> {
        match self.conn.lookup_domain_by_name(&domain_name(id)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn exists(&self, id: Uuid) -> Result<bool> {
        Ok(self.lookup(id)?.is_some())
    }

    pub fn power(&self, id: Uuid) -> Result<Power> {
        let Some(d) = self.lookup(id)? else {
            return Ok(Power::NoState);
        };
        let (state, _) = d.state()?;
        Ok(match state {
            Enum::Known(DomainState::Running | DomainState::Blocked) => Power::Running,
            Enum::Known(DomainState::Paused) => Power::Paused,
            Enum::Known(DomainState::Shutdown | DomainState::Shutoff) => {
                if d.has_managed_save(0)? {
                    Power::Suspended
                } else {
                    Power::Shutdown
                }
            }
            Enum::Known(DomainState::Crashed) => Power::Crashed,
            _ => Power::NoState,
        })
    }

    fn xml(&self, s: &DomainSpec) -> String {
        let mut disks = format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
            xml_escape(&s.disk)
        );
        if let Some(cd) = &s.config_drive {
            disks.push_str(&format!(
                "<disk type='file' device='cdrom'><source file='{}'/>\
                 <target dev='hdd' bus='ide'/><readonly/></disk>",
                xml_escape(cd)
            ));
        }
        format!(
            "<domain type='{}'><name>{}</name><uuid>{}</uuid>\
             <memory unit='MiB'>{}</memory><vcpu>{}</vcpu>\
             <os><type arch='x86_64'>hvm</type></os>\
             <devices>{disks}</devices></domain>",
            xml_escape(&self.domain_type),
            domain_name(s.id),
            s.id,
            s.ram_mb,
            s.vcpus
        )
    }

    /// Defines the domain (unless it exists) and starts it paused (unless it runs).
    pub fn define_start_paused(&self, s: &DomainSpec) -> Result<()> {
        let d = match self.lookup(s.id)? {
            Some(d) => d,
            None => self.conn.define_domain_xml(&self.xml(s))?,
        };
        if d.is_active()? {
            return Ok(());
        }
        match d.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED) {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("unsupported flags") => {
                // The test driver: start, then pause at once.
                d.create()?;
                d.suspend()?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Resumes a paused domain; a running one is left running.
    pub fn unpause(&self, id: Uuid) -> Result<()> {
        let d = self.lookup(id)?.ok_or_else(|| gone(id))?;
        if matches!(d.state()?.0, Enum::Known(DomainState::Paused)) {
            d.resume()?;
        }
        Ok(())
    }

    pub fn pause(&self, id: Uuid) -> Result<()> {
        let d = self.lookup(id)?.ok_or_else(|| gone(id))?;
        if matches!(
            d.state()?.0,
            Enum::Known(DomainState::Running | DomainState::Blocked)
        ) {
            d.suspend()?;
        }
        Ok(())
    }

    /// Powers the domain on (restoring a managed save if there is one).
    pub fn start(&self, id: Uuid) -> Result<()> {
        let d = self.lookup(id)?.ok_or_else(|| gone(id))?;
        if !d.is_active()? {
            d.create()?;
        }
        Ok(())
    }

    /// Powers the domain off (hard: destroy).
    pub fn stop(&self, id: Uuid) -> Result<()> {
        let d = self.lookup(id)?.ok_or_else(|| gone(id))?;
        if d.is_active()? {
            d.destroy()?;
        }
        Ok(())
    }

    /// Nova's suspend: save the guest's memory and stop it (managed save).
    pub fn suspend(&self, id: Uuid) -> Result<()> {
        let d = self.lookup(id)?.ok_or_else(|| gone(id))?;
        if d.is_active()? {
            d.managed_save(0)?;
        }
        Ok(())
    }

    pub fn reboot(&self, id: Uuid, hard: bool) -> Result<()> {
        let d = self.lookup(id)?.ok_or_else(|| gone(id))?;
        if !d.is_active()? {
            d.create()?;
            return Ok(());
        }
        if matches!(d.state()?.0, Enum::Known(DomainState::Paused)) {
            d.resume()?;
        }
        if hard {
            d.reset()?;
        } else {
            d.reboot(0)?;
        }
        Ok(())
    }

    /// Destroys and undefines the domain (with any managed save); nothing if it is gone.
    pub fn destroy(&self, id: Uuid) -> Result<()> {
        let Some(d) = self.lookup(id)? else {
            return Ok(());
        };
        if d.is_active()? {
            d.destroy()?;
        }
        d.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)?;
        Ok(())
    }

    /// The servers of every `cirrus-<id>` domain this connection sees.
    pub fn our_domains(&self) -> Result<Vec<Uuid>> {
        let all = self.conn.list_all_domains(0)?;
        Ok(all
            .iter()
            .filter_map(|d| d.name().ok())
            .filter_map(|n| {
                n.strip_prefix("cirrus-")
                    .and_then(|i| Uuid::parse_str(i).ok())
            })
            .collect())
    }
}

fn gone(id: Uuid) -> VirtError {
    VirtError(format!("domain {} does not exist", domain_name(id)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The real test driver: every operation is idempotent and the power
    /// states map as Nova's.
    #[test]
    fn operations_on_the_test_driver_are_idempotent() {
        let lv = Libvirt::open("test:///default", "test").unwrap();
        let id = Uuid::new_v4();
        let spec = DomainSpec {
            id,
            vcpus: 1,
            ram_mb: 64,
            disk: "/nonexistent/disk.qcow2".into(),
            config_drive: Some("/nonexistent/cd.iso".into()),
        };
        assert_eq!(lv.power(id).unwrap(), Power::NoState);
        lv.define_start_paused(&spec).unwrap();
        lv.define_start_paused(&spec).unwrap();
        assert_eq!(lv.power(id).unwrap(), Power::Paused);
        lv.unpause(id).unwrap();
        lv.unpause(id).unwrap();
        assert_eq!(lv.power(id).unwrap(), Power::Running);
        lv.pause(id).unwrap();
        assert_eq!(lv.power(id).unwrap(), Power::Paused);
        lv.unpause(id).unwrap();
        lv.suspend(id).unwrap();
        assert_eq!(lv.power(id).unwrap(), Power::Suspended);
        lv.start(id).unwrap();
        assert_eq!(lv.power(id).unwrap(), Power::Running);
        lv.reboot(id, true).unwrap();
        lv.stop(id).unwrap();
        lv.stop(id).unwrap();
        assert_eq!(lv.power(id).unwrap(), Power::Shutdown);
        assert!(lv.our_domains().unwrap().contains(&id));
        lv.destroy(id).unwrap();
        lv.destroy(id).unwrap();
        assert!(!lv.exists(id).unwrap());
        assert_eq!(
            lv.unpause(id).unwrap_err().0,
            format!("domain cirrus-{id} does not exist")
        );
    }

    #[test]
    fn names_in_the_xml_are_escaped() {
        let lv = Libvirt::open("test:///default", "test").unwrap();
        let xml = lv.xml(&DomainSpec {
            id: Uuid::nil(),
            vcpus: 2,
            ram_mb: 128,
            disk: "/a'<b>&c".into(),
            config_drive: None,
        });
        assert!(xml.contains("/a&apos;&lt;b&gt;&amp;c"), "{xml}");
        assert!(xml.starts_with("<domain type='test'>"));
    }
}

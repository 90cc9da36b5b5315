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

/// A disk of a domain: a file and how its bytes are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// The guest device (`vda`, `vdb`, ...), on the virtio bus.
    pub dev: String,
    pub readonly: bool,
}

/// Direct kernel boot (an image with `kernel_id` / `ramdisk_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
}

/// A guest NIC plugged into an Open vSwitch bridge as a port's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub bridge: String,
    pub interface_id: String,
    pub mac: String,
}

/// What a domain is made of.
#[derive(Debug, Clone, Default)]
pub struct DomainSpec {
    pub id: Uuid,
    pub vcpus: u32,
    pub ram_mb: u32,
    pub disks: Vec<Disk>,
    pub boot: Option<DirectBoot>,
    pub nics: Vec<Nic>,
    /// Where the guest's serial port writes (appending).
    pub serial_log: Option<String>,
    /// The serial port's interactive side: a Unix socket QEMU listens on
    /// (one client at a time; what the guest writes goes to `serial_log`
    /// whether or not one is connected).
    pub serial_socket: Option<String>,
}

/// How a [`Libvirt::shutdown`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The guest powered off on the ACPI power button.
    Clean,
    /// It did not within the timeout (or was paused): destroyed.
    Destroyed,
    AlreadyOff,
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
        let domain_type = if domain_type == "auto" {
            detect_domain_type(&conn, uri)
        } else {
            domain_type.to_string()
        };
        Ok(Self {
            conn: Arc::new(conn),
            domain_type,
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

    pub fn domain_type(&self) -> &str {
        &self.domain_type
    }

    fn xml(&self, s: &DomainSpec) -> String {
        let test = self.domain_type == "test";
        let mut devices = String::new();
        for d in &s.disks {
            devices.push_str(&disk_xml(d));
        }
        for n in &s.nics {
            devices.push_str(&nic_xml(n));
        }
        match (&s.serial_log, &s.serial_socket) {
            _ if test => {}
            (Some(log), Some(sock)) => devices.push_str(&format!(
                "<serial type='unix'><source mode='bind' path='{}'/>\
                 <log file='{}' append='on'/><target port='0'/></serial>",
                xml_escape(sock),
                xml_escape(log)
            )),
            (Some(log), None) => devices.push_str(&format!(
                "<serial type='file'><source path='{}' append='on'/><target port='0'/></serial>",
                xml_escape(log)
            )),
            (None, _) => {}
        }
        if !test {
            devices.push_str("<memballoon model='none'/>");
        }
        let mut os = String::from("<type arch='x86_64'>hvm</type>");
        if let Some(b) = &s.boot {
            os.push_str(&format!("<kernel>{}</kernel>", xml_escape(&b.kernel)));
            if let Some(i) = &b.initrd {
                os.push_str(&format!("<initrd>{}</initrd>", xml_escape(i)));
            }
            os.push_str(&format!("<cmdline>{}</cmdline>", xml_escape(&b.cmdline)));
        } else if !test {
            os.push_str("<boot dev='hd'/>");
        }
        let extra = if test {
            ""
        } else {
            "<features><acpi/><apic/></features><clock offset='utc'/>\
             <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>\
             <on_crash>destroy</on_crash>"
        };
        format!(
            "<domain type='{}'><name>{}</name><uuid>{}</uuid>\
             <memory unit='MiB'>{}</memory><vcpu>{}</vcpu>\
             <os>{os}</os>{extra}<devices>{devices}</devices></domain>",
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

    /// Nova's clean shutdown: press the guest's ACPI power button and wait
    /// up to `timeout` for it to power off, then destroy it. Whether the
    /// guest went by itself is returned (`Clean`) or not (`Destroyed`).
    /// A paused guest cannot see the button: it is destroyed at once.
    pub fn shutdown(&self, id: Uuid, timeout: std::time::Duration) -> Result<Stopped> {
        let d = self.lookup(id)?.ok_or_else(|| gone(id))?;
        if !d.is_active()? {
            return Ok(Stopped::AlreadyOff);
        }
        let paused = matches!(d.state()?.0, Enum::Known(DomainState::Paused));
        if !paused && self.domain_type != "test" {
            let deadline = std::time::Instant::now() + timeout;
            // The button again every few seconds: a guest still booting may
            // not have its handler yet.
            let mut pressed: Option<std::time::Instant> = None;
            while std::time::Instant::now() < deadline {
                if !d.is_active()? {
                    return Ok(Stopped::Clean);
                }
                if pressed.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) {
                    match d.shutdown_flags(virt::sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
                        Ok(()) => {}
                        // It went off between the check and the press.
                        Err(_) if !d.is_active()? => return Ok(Stopped::Clean),
                        Err(e) => return Err(e.into()),
                    }
                    pressed = Some(std::time::Instant::now());
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            if !d.is_active()? {
                return Ok(Stopped::Clean);
            }
        }
        match d.destroy() {
            Ok(()) => Ok(Stopped::Destroyed),
            Err(_) if !d.is_active()? => Ok(Stopped::Clean),
            Err(e) => Err(e.into()),
        }
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

    /// Plugs a disk into the domain, live (if it runs) and in its
    /// definition; a disk already there (same target) is left as it is.
    pub fn attach_disk(&self, id: Uuid, d: &Disk) -> Result<()> {
        let dom = self.lookup(id)?.ok_or_else(|| gone(id))?;
        let xml = dom.xml_desc(0)?;
        if xml.contains(&format!("dev='{}'", xml_escape(&d.dev))) {
            return Ok(());
        }
        let mut flags = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
        if dom.is_active()? {
            flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        dom.attach_device_flags(&disk_xml(d), flags)?;
        Ok(())
    }

    /// Unplugs the disk with target `dev`, live and from the definition;
    /// nothing if it is not there.
    pub fn detach_disk(&self, id: Uuid, d: &Disk) -> Result<()> {
        let Some(dom) = self.lookup(id)? else {
            return Ok(());
        };
        let xml = dom.xml_desc(0)?;
        if !xml.contains(&format!("dev='{}'", xml_escape(&d.dev))) {
            return Ok(());
        }
        let mut flags = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
        if dom.is_active()? {
            flags |= virt::sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        dom.detach_device_flags(&disk_xml(d), flags)?;
        Ok(())
    }

    /// The disk targets of the domain's definition (`vda`, ...).
    pub fn disk_targets(&self, id: Uuid) -> Result<Vec<String>> {
        let Some(dom) = self.lookup(id)? else {
            return Ok(Vec::new());
        };
        let xml = dom.xml_desc(0)?;
        Ok(xml
            .split("<target dev='")
            .skip(1)
            .filter_map(|t| t.split('\'').next())
            .map(str::to_string)
            .collect())
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

/// `kvm` when libvirt offers it and this host is not itself a guest, else
/// `qemu` (TCG). Nested KVM guests hang once their kernel starts on these
/// machines (ARCHITECTURE.md), and `/dev/kvm` may be closed to the user QEMU
/// runs as — both show up as "kvm offered" to a naive check, so a host that
/// runs under a hypervisor (the `hypervisor` CPU flag) takes TCG.
pub fn detect_domain_type(conn: &Connect, uri: &str) -> String {
    if uri.starts_with("test:") {
        return "test".into();
    }
    let kvm_offered = conn
        .domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0)
        .is_ok();
    let nested = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
        })
        .unwrap_or(true);
    if kvm_offered && !nested {
        "kvm"
    } else {
        "qemu"
    }
    .into()
}

fn disk_xml(d: &Disk) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{}'/>\
         <source file='{}'/><target dev='{}' bus='virtio'/>{}</disk>",
        xml_escape(&d.format),
        xml_escape(&d.path),
        xml_escape(&d.dev),
        if d.readonly { "<readonly/>" } else { "" }
    )
}

fn nic_xml(n: &Nic) -> String {
    format!(
        "<interface type='bridge'><source bridge='{}'/>\
         <virtualport type='openvswitch'><parameters interfaceid='{}'/></virtualport>\
         <mac address='{}'/><model type='virtio'/><rom enabled='no'/></interface>",
        xml_escape(&n.bridge),
        xml_escape(&n.interface_id),
        xml_escape(&n.mac)
    )
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
            disks: vec![Disk {
                path: "/nonexistent/disk.qcow2".into(),
                format: "qcow2".into(),
                dev: "vda".into(),
                readonly: false,
            }],
            serial_log: Some("/nonexistent/console.log".into()),
            ..Default::default()
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
            disks: vec![Disk {
                path: "/a'<b>&c".into(),
                format: "qcow2".into(),
                dev: "vda".into(),
                readonly: false,
            }],
            ..Default::default()
        });
        assert!(xml.contains("/a&apos;&lt;b&gt;&amp;c"), "{xml}");
        assert!(xml.starts_with("<domain type='test'>"));
    }

    /// What qemu:///system is given: direct kernel boot, virtio disks, the
    /// OVS port as a bridge interface with its port id, the serial log.
    #[test]
    fn a_qemu_domain_boots_its_kernel_plugs_its_port_and_logs_its_serial_port() {
        let lv = Libvirt::open("test:///default", "test").unwrap();
        let lv = Libvirt {
            domain_type: "qemu".into(),
            ..lv
        };
        let xml = lv.xml(&DomainSpec {
            id: Uuid::nil(),
            vcpus: 1,
            ram_mb: 256,
            disks: vec![
                Disk {
                    path: "/s/disk.qcow2".into(),
                    format: "qcow2".into(),
                    dev: "vda".into(),
                    readonly: false,
                },
                Disk {
                    path: "/s/config-drive.iso".into(),
                    format: "raw".into(),
                    dev: "vdb".into(),
                    readonly: true,
                },
            ],
            boot: Some(DirectBoot {
                kernel: "/c/k".into(),
                initrd: Some("/c/r".into()),
                cmdline: "console=ttyS0".into(),
            }),
            nics: vec![Nic {
                bridge: "br-int".into(),
                interface_id: "p1".into(),
                mac: "fa:16:3e:00:00:01".into(),
            }],
            serial_log: Some("/s/console.log".into()),
            serial_socket: None,
        });
        for want in [
            "<domain type='qemu'>",
            "<kernel>/c/k</kernel><initrd>/c/r</initrd><cmdline>console=ttyS0</cmdline>",
            "<source file='/s/config-drive.iso'/><target dev='vdb' bus='virtio'/><readonly/>",
            "<interface type='bridge'><source bridge='br-int'/><virtualport type='openvswitch'>\
             <parameters interfaceid='p1'/></virtualport><mac address='fa:16:3e:00:00:01'/>\
             <model type='virtio'/>",
            "<serial type='file'><source path='/s/console.log' append='on'/>",
        ] {
            assert!(xml.contains(want), "{want} not in {xml}");
        }
        // With an interactive side: a Unix socket QEMU listens on, and the log.
        let xml = lv.xml(&DomainSpec {
            id: Uuid::nil(),
            vcpus: 1,
            ram_mb: 256,
            serial_log: Some("/s/console.log".into()),
            serial_socket: Some("/s/console.sock".into()),
            ..Default::default()
        });
        let want = "<serial type='unix'><source mode='bind' path='/s/console.sock'/>\
                    <log file='/s/console.log' append='on'/><target port='0'/></serial>";
        assert!(xml.contains(want), "{want} not in {xml}");
    }
}

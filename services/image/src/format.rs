//! Checks, as the bytes stream in, that an upload is what its disk and
//! container formats say, reading only the first bytes of the image.
//!
//! The dangerous case is qcow2: a qcow2 file may name a *backing file* or an
//! *external data file* by host path, and a QEMU given such an image reads
//! that host file into the guest. So a qcow2 upload is refused when its
//! header names a backing file, sets the external-data-file feature bit,
//! carries the external data file name extension, or uses feature bits this
//! parser does not know. For the same reason a `raw`, `aki` or `ari` upload
//! whose first bytes are a qcow2 (or another container format's) header is
//! refused: something downstream that probes formats must never see one.
//!
//! The qcow2 header layout is QEMU's `docs/interop/qcow2.txt` (all fields
//! big-endian). Memory stays bounded: at most [`MAX_HEAD`] bytes are kept.

use crate::model::{ContainerFormat, DiskFormat};

/// The most bytes kept to decide: a qcow2 header and its extensions live in
/// the first cluster, and clusters are at most 2 MiB.
pub const MAX_HEAD: usize = 2 * 1024 * 1024;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Header extension types (qcow2.txt, "Header extensions").
const EXT_END: u32 = 0;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
/// Incompatible feature bits.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_KNOWN: u64 = 0b1_1111;
/// ISO 9660: the primary volume descriptor at sector 16 starts `\x01CD001`.
const ISO_MAGIC_AT: usize = 32769;
const ISO_MAGIC: &[u8; 5] = b"CD001";
/// A POSIX tar header has `ustar` at offset 257.
const TAR_MAGIC_AT: usize = 257;
const TAR_MAGIC: &[u8; 5] = b"ustar";

/// Why an upload's bytes were refused; the message is safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

enum Verdict {
    Accept,
    Reject(String),
    /// Decide once this many bytes are in (or at the end of the data).
    NeedMore(usize),
}

/// Watches the start of an upload and decides whether it is acceptable.
pub struct Inspector {
    disk: DiskFormat,
    container: ContainerFormat,
    head: Vec<u8>,
    need: usize,
    decided: Option<Result<(), Rejected>>,
}

impl Inspector {
    pub fn new(disk: DiskFormat, container: ContainerFormat) -> Self {
        Self {
            disk,
            container,
            head: Vec::new(),
            need: 1,
            decided: None,
        }
    }

    /// Feeds the next bytes; fails as soon as the data is known to be bad.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Rejected> {
        if let Some(d) = &self.decided {
            return d.clone();
        }
        let room = MAX_HEAD.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..data.len().min(room)]);
        if self.head.len() >= self.need || self.head.len() >= MAX_HEAD {
            self.decide(false)
        } else {
            Ok(())
        }
    }

    /// The data has ended: decide with what there is.
    pub fn finish(&mut self) -> Result<(), Rejected> {
        if let Some(d) = &self.decided {
            return d.clone();
        }
        self.decide(true)
    }

    fn decide(&mut self, eof: bool) -> Result<(), Rejected> {
        let verdict = match self.container {
            ContainerFormat::Ovf => check_tar(&self.head),
            ContainerFormat::Bare => match self.disk {
                DiskFormat::Qcow2 => check_qcow2(&self.head),
                DiskFormat::Iso => check_iso(&self.head),
                DiskFormat::Raw | DiskFormat::Aki | DiskFormat::Ari => check_plain(&self.head),
            },
        };
        let done = match verdict {
            Verdict::Accept => Ok(()),
            Verdict::Reject(why) => Err(Rejected(why)),
            Verdict::NeedMore(n) if n > MAX_HEAD || self.head.len() >= MAX_HEAD => Err(Rejected(
                format!("the {} header is larger than {MAX_HEAD} bytes", self.disk),
            )),
            Verdict::NeedMore(n) if !eof => {
                self.need = n;
                return Ok(());
            }
            Verdict::NeedMore(_) => match (self.container, self.disk) {
                (ContainerFormat::Bare, DiskFormat::Raw | DiskFormat::Aki | DiskFormat::Ari) => {
                    Ok(())
                }
                (ContainerFormat::Ovf, _) => Err(Rejected(
                    "the data is too short to be an OVF package (a tar archive)".into(),
                )),
                (_, d) => Err(Rejected(format!("the data is too short to be a {d} image"))),
            },
        };
        // Free the head: nothing more is needed from it.
        self.head = Vec::new();
        self.decided = Some(done.clone());
        done
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Formats whose header must never appear at the start of a raw disk,
/// kernel or ramdisk: something that probes formats would trust it.
fn disguised(head: &[u8]) -> Option<&'static str> {
    const MAGICS: [(&[u8], &str); 5] = [
        (QCOW2_MAGIC, "qcow2"),
        (b"QED\0", "QED"),
        (b"KDMV", "VMDK"),
        (b"vhdxfile", "VHDX"),
        (b"conectix", "VHD"),
    ];
    MAGICS
        .iter()
        .find(|(m, _)| head.starts_with(m))
        .map(|(_, name)| *name)
}

fn check_plain(head: &[u8]) -> Verdict {
    if head.len() < 8 {
        return Verdict::NeedMore(8);
    }
    match disguised(head) {
        Some(f) => Verdict::Reject(format!(
            "the data is a {f} image, not the declared format; declare its real format"
        )),
        None => Verdict::Accept,
    }
}

fn check_iso(head: &[u8]) -> Verdict {
    let end = ISO_MAGIC_AT + ISO_MAGIC.len();
    if head.len() < end {
        return Verdict::NeedMore(end);
    }
    if &head[ISO_MAGIC_AT..end] == ISO_MAGIC {
        Verdict::Accept
    } else {
        Verdict::Reject("the data is not an ISO 9660 image (no CD001 volume descriptor)".into())
    }
}

fn check_tar(head: &[u8]) -> Verdict {
    let end = TAR_MAGIC_AT + TAR_MAGIC.len();
    if head.len() < end {
        return Verdict::NeedMore(end);
    }
    if &head[TAR_MAGIC_AT..end] == TAR_MAGIC {
        Verdict::Accept
    } else {
        Verdict::Reject("an OVF package must be a tar archive (OVA)".into())
    }
}

fn check_qcow2(head: &[u8]) -> Verdict {
    let reject = |m: &str| Verdict::Reject(format!("qcow2: {m}"));
    if head.len() < 72 {
        return Verdict::NeedMore(72);
    }
    if !head.starts_with(QCOW2_MAGIC) {
        return Verdict::Reject("the data is not a qcow2 image (bad magic)".into());
    }
    let (Some(version), Some(backing_offset), Some(backing_size), Some(cluster_bits)) =
        (be32(head, 4), be64(head, 8), be32(head, 16), be32(head, 20))
    else {
        return Verdict::NeedMore(72);
    };
    if version != 2 && version != 3 {
        return reject(&format!("unsupported version {version}"));
    }
    if backing_offset != 0 || backing_size != 0 {
        return reject("the image names a backing file, which is not allowed");
    }
    if !(9..=21).contains(&cluster_bits) {
        return reject(&format!("invalid cluster_bits {cluster_bits}"));
    }
    let cluster_size = 1usize << cluster_bits;

    let header_length = if version == 2 {
        72usize
    } else {
        if head.len() < 104 {
            return Verdict::NeedMore(104);
        }
        let incompatible = be64(head, 72).unwrap_or(u64::MAX);
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return reject("the image uses an external data file, which is not allowed");
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return reject("the image is marked corrupt");
        }
        if incompatible & !INCOMPAT_KNOWN != 0 {
            return reject(&format!("unknown incompatible features {incompatible:#x}"));
        }
        let len = be32(head, 100).unwrap_or(0) as usize;
        if len < 104 || !len.is_multiple_of(8) || len > cluster_size {
            return reject(&format!("invalid header_length {len}"));
        }
        len
    };

    // Header extensions: (type u32, length u32, data padded to 8 bytes)
    // until an end marker, all within the first cluster.
    let mut at = header_length;
    loop {
        if at + 8 > cluster_size {
            return reject("header extensions run past the first cluster");
        }
        if head.len() < at + 8 {
            return Verdict::NeedMore(at + 8);
        }
        let (Some(kind), Some(len)) = (be32(head, at), be32(head, at + 4)) else {
            return Verdict::NeedMore(at + 8);
        };
        if kind == EXT_END {
            return Verdict::Accept;
        }
        if kind == EXT_EXTERNAL_DATA_FILE {
            return reject("the image names an external data file, which is not allowed");
        }
        let padded = (len as usize).div_ceil(8) * 8;
        at = at + 8 + padded;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn inspect(disk: DiskFormat, data: &[u8], chunk: usize) -> Result<(), Rejected> {
        let mut i = Inspector::new(disk, ContainerFormat::Bare);
        for c in data.chunks(chunk.max(1)) {
            i.feed(c)?;
        }
        i.finish()
    }

    fn qcow2_v3(incompatible: u64, exts: &[(u32, &[u8])]) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[0..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        for (kind, data) in exts {
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
            h.extend_from_slice(data);
            h.resize(h.len().div_ceil(8) * 8, 0);
        }
        h.extend_from_slice(&[0u8; 8]);
        h.resize(4096, 0);
        h
    }

    #[test]
    fn clean_qcow2_passes_in_any_chunking() {
        let img = qcow2_v3(0, &[(0xe279_2aca, b"raw"), (0x6803_f857, &[1u8; 48])]);
        for chunk in [1, 7, 100, 4096] {
            assert_eq!(inspect(DiskFormat::Qcow2, &img, chunk), Ok(()), "{chunk}");
        }
    }

    #[test]
    fn qcow2_with_data_file_or_backing_is_rejected() {
        let flag = qcow2_v3(INCOMPAT_DATA_FILE, &[]);
        assert!(inspect(DiskFormat::Qcow2, &flag, 3).is_err());
        let ext = qcow2_v3(0, &[(EXT_EXTERNAL_DATA_FILE, b"/etc/shadow")]);
        assert!(inspect(DiskFormat::Qcow2, &ext, 5).is_err());
        let mut backing = qcow2_v3(0, &[]);
        backing[8..16].copy_from_slice(&512u64.to_be_bytes());
        backing[16..20].copy_from_slice(&11u32.to_be_bytes());
        let e = inspect(DiskFormat::Qcow2, &backing, 4096).unwrap_err();
        assert!(e.0.contains("backing"), "{e}");
        let unknown = qcow2_v3(1 << 40, &[]);
        assert!(inspect(DiskFormat::Qcow2, &unknown, 4096).is_err());
    }

    #[test]
    fn truncated_or_endless_qcow2_is_rejected() {
        let img = qcow2_v3(0, &[]);
        assert!(inspect(DiskFormat::Qcow2, &img[..50], 10).is_err());
        // Extensions that never end run off the first cluster.
        let mut endless = qcow2_v3(0, &[]);
        for at in (104..4096).step_by(8) {
            endless[at..at + 4].copy_from_slice(&7u32.to_be_bytes());
        }
        assert!(inspect(DiskFormat::Qcow2, &endless, 4096).is_err());
        assert!(inspect(DiskFormat::Qcow2, b"not a qcow2 image at all, just text......................................................", 9).is_err());
    }

    #[test]
    fn raw_kernel_and_ramdisk_must_not_hide_another_format() {
        assert_eq!(inspect(DiskFormat::Raw, &[0u8; 1000], 3), Ok(()));
        assert_eq!(inspect(DiskFormat::Raw, b"", 1), Ok(()));
        assert_eq!(inspect(DiskFormat::Aki, b"MZ kernel", 1), Ok(()));
        let q = qcow2_v3(0, &[]);
        for d in [DiskFormat::Raw, DiskFormat::Aki, DiskFormat::Ari] {
            assert!(inspect(d, &q, 2).is_err(), "{d}");
        }
        assert!(inspect(DiskFormat::Raw, b"KDMV\x01\0\0\0rest", 100).is_err());
    }

    #[test]
    fn iso_needs_its_volume_descriptor() {
        let mut iso = vec![0u8; 40000];
        iso[ISO_MAGIC_AT - 1] = 1;
        iso[ISO_MAGIC_AT..ISO_MAGIC_AT + 5].copy_from_slice(ISO_MAGIC);
        assert_eq!(inspect(DiskFormat::Iso, &iso, 1000), Ok(()));
        assert!(inspect(DiskFormat::Iso, &vec![0u8; 40000], 1000).is_err());
        assert!(inspect(DiskFormat::Iso, &[0u8; 100], 10).is_err());
    }

    #[test]
    fn ovf_must_be_a_tar() {
        let mut tar = vec![0u8; 1024];
        tar[TAR_MAGIC_AT..TAR_MAGIC_AT + 5].copy_from_slice(TAR_MAGIC);
        let mut i = Inspector::new(DiskFormat::Qcow2, ContainerFormat::Ovf);
        assert_eq!(i.feed(&tar).and_then(|()| i.finish()), Ok(()));
        let mut i = Inspector::new(DiskFormat::Raw, ContainerFormat::Ovf);
        assert!(i.feed(&[0u8; 1024]).is_err());
    }
}

//! The format inspector: checks, as the bytes stream in, that an upload is
//! what its disk and container formats say, and *only* that.
//!
//! Whatever the declaration, every upload is probed for the header of every
//! format QEMU would recognise (qcow2, qcow, QED, VMDK sparse and
//! descriptor, VHD, VHDX, LUKS, VDI, Parallels, Bochs, cloop, DMG's
//! trailer) and for ISO 9660 and tar. The upload is refused unless exactly
//! the declared format is found: a `raw`, `aki` or `ari` upload must carry
//! none of them, a `qcow2` only qcow2, an `iso` only ISO 9660, an `ovf`
//! package only a tar archive. A polyglot file, one that reads as two
//! formats (a qcow2 that is also an ISO 9660 image, a qcow2 that is also a
//! valid tar header), is refused whichever of the two is declared: some
//! tool downstream would probe it and see the other one. This is the rule
//! Glance's format inspector follows since OSSA-2024-001/002.
//!
//! The dangerous case is qcow2: a qcow2 file may name a *backing file* or an
//! *external data file* by host path, and a QEMU given such an image reads
//! that host file into the guest. So a qcow2 upload is refused when its
//! header names a backing file, sets the external-data-file feature bit,
//! carries the external data file name extension, or uses feature bits this
//! parser does not know.
//!
//! The qcow2 header layout is QEMU's `docs/interop/qcow2.txt` (all fields
//! big-endian); the other probes follow QEMU's `block/*.c` `*_probe`
//! functions. Memory stays bounded: at most [`MAX_HEAD`] bytes of the start
//! and 512 of the end are kept.

use crate::model::{ContainerFormat, DiskFormat};

/// The most bytes kept to decide: a qcow2 header and its extensions live in
/// the first cluster, and clusters are at most 2 MiB.
pub const MAX_HEAD: usize = 2 * 1024 * 1024;
/// Every probe but qcow2's extension walk decides within this many bytes:
/// the ISO 9660 volume descriptor at sector 16 is the farthest.
const PROBE_LEN: usize = ISO_MAGIC_AT + ISO_MAGIC.len();
/// QEMU probes formats from the first 2 KiB (`BLOCK_PROBE_BUF_SIZE`).
const QEMU_PROBE_LEN: usize = 2048;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Header extension types (qcow2.txt, "Header extensions").
const EXT_END: u32 = 0;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
/// Incompatible feature bits.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_KNOWN: u64 = 0b1_1111;
/// ISO 9660: the first volume descriptor, at sector 16, holds `CD001` at
/// its byte 1.
const ISO_MAGIC_AT: usize = 32769;
const ISO_MAGIC: &[u8; 5] = b"CD001";
/// A POSIX tar header has `ustar` at offset 257 and its checksum at 148.
const TAR_MAGIC_AT: usize = 257;
const TAR_MAGIC: &[u8; 5] = b"ustar";
const TAR_BLOCK: usize = 512;
/// VDI: the signature after the 64-byte text banner (little-endian).
const VDI_SIGNATURE: u32 = 0xbeda_107f;
/// cloop's shell preamble (block/cloop.c).
const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
/// DMG: a 512-byte "koly" trailer ends the file.
const DMG_TRAILER: &[u8; 4] = b"koly";
const TAIL: usize = 512;

/// Why an upload's bytes were refused; the message is safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// A format recognised by its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    Qcow2,
    /// qcow version 1 (or a qcow magic with an unknown version).
    Qcow,
    Qed,
    Vmdk,
    Vhd,
    Vhdx,
    Luks,
    Vdi,
    Parallels,
    Bochs,
    Cloop,
    Dmg,
    Iso,
    Tar,
}

impl Probed {
    pub fn name(self) -> &'static str {
        match self {
            Probed::Qcow2 => "qcow2",
            Probed::Qcow => "qcow (version 1)",
            Probed::Qed => "QED",
            Probed::Vmdk => "VMDK",
            Probed::Vhd => "VHD",
            Probed::Vhdx => "VHDX",
            Probed::Luks => "LUKS",
            Probed::Vdi => "VDI",
            Probed::Parallels => "Parallels",
            Probed::Bochs => "Bochs",
            Probed::Cloop => "cloop",
            Probed::Dmg => "DMG",
            Probed::Iso => "ISO 9660",
            Probed::Tar => "tar",
        }
    }
}

/// Every format whose header is at the start of `head` (which holds at
/// least [`PROBE_LEN`] bytes, or the whole data if it is shorter).
pub fn probe(head: &[u8]) -> Vec<Probed> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let mut found = Vec::new();
    if at(0, QCOW2_MAGIC) {
        found.push(match be32(head, 4) {
            Some(2 | 3) => Probed::Qcow2,
            _ => Probed::Qcow,
        });
    }
    if at(0, b"QED\0") {
        found.push(Probed::Qed);
    }
    if at(0, b"KDMV") || at(0, b"COWD") || vmdk_descriptor(head) {
        found.push(Probed::Vmdk);
    }
    if at(0, b"conectix") {
        found.push(Probed::Vhd);
    }
    if at(0, b"vhdxfile") {
        found.push(Probed::Vhdx);
    }
    if at(0, b"LUKS\xba\xbe") {
        found.push(Probed::Luks);
    }
    if head
        .get(64..68)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        == Some(VDI_SIGNATURE)
    {
        found.push(Probed::Vdi);
    }
    if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        found.push(Probed::Parallels);
    }
    if at(0, b"Bochs Virtual HD Image") {
        found.push(Probed::Bochs);
    }
    if at(0, CLOOP_MAGIC) {
        found.push(Probed::Cloop);
    }
    if at(ISO_MAGIC_AT, ISO_MAGIC) {
        found.push(Probed::Iso);
    }
    if tar_header(head) {
        found.push(Probed::Tar);
    }
    found
}

/// QEMU's `vmdk_probe` for a text descriptor: after comment and blank
/// lines, a `version=1|2|3` line; or the descriptor's usual first line.
fn vmdk_descriptor(head: &[u8]) -> bool {
    let buf = &head[..head.len().min(QEMU_PROBE_LEN)];
    if buf.starts_with(b"# Disk DescriptorFile") {
        return true;
    }
    let mut p = 0;
    while p < buf.len() {
        match buf[p] {
            b'#' => {
                while p < buf.len() && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < buf.len() && buf[p] == b' ' {
                    p += 1;
                }
                if p < buf.len() && buf[p] == b'\r' {
                    p += 1;
                }
                if p == buf.len() || buf[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &buf[p..];
                return [b'1', b'2', b'3'].iter().any(|v| {
                    let mut line = b"version=".to_vec();
                    line.push(*v);
                    rest.starts_with(&[line.as_slice(), b"\n"].concat())
                        || rest.starts_with(&[line.as_slice(), b"\r\n"].concat())
                });
            }
        }
    }
    false
}

/// A POSIX (ustar) tar header whose checksum is right.
fn tar_header(head: &[u8]) -> bool {
    let Some(block) = head.get(..TAR_BLOCK) else {
        return false;
    };
    if &block[TAR_MAGIC_AT..TAR_MAGIC_AT + TAR_MAGIC.len()] != TAR_MAGIC {
        return false;
    }
    let field = &block[148..156];
    let digits: String = field
        .iter()
        .map(|b| *b as char)
        .skip_while(|c| *c == ' ')
        .take_while(|c| c.is_digit(8))
        .collect();
    let Ok(stored) = u32::from_str_radix(&digits, 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                0x20
            } else {
                u32::from(*b)
            }
        })
        .sum();
    sum == stored
}

enum Verdict {
    Accept,
    Reject(String),
    /// Decide once this many bytes are in (or at the end of the data).
    NeedMore(usize),
}

/// Watches an upload and decides whether it is acceptable.
pub struct Inspector {
    disk: DiskFormat,
    container: ContainerFormat,
    head: Vec<u8>,
    need: usize,
    decided: Option<Result<(), Rejected>>,
    /// The last [`TAIL`] bytes seen, for trailers.
    tail: Vec<u8>,
}

impl Inspector {
    pub fn new(disk: DiskFormat, container: ContainerFormat) -> Self {
        Self {
            disk,
            container,
            head: Vec::new(),
            need: PROBE_LEN,
            decided: None,
            tail: Vec::with_capacity(2 * TAIL),
        }
    }

    /// Feeds the next bytes; fails as soon as the data is known to be bad.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Rejected> {
        self.keep_tail(data);
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

    /// The data has ended: decide with what there is, then look at its end.
    pub fn finish(&mut self) -> Result<(), Rejected> {
        if self.decided.is_none() {
            self.decide(true)?;
        }
        if let Some(Err(e)) = &self.decided {
            return Err(e.clone());
        }
        if self.tail.len() == TAIL && self.tail.starts_with(DMG_TRAILER) {
            return Err(Rejected(format!(
                "the data ends with a {} trailer, which is not the declared {}",
                Probed::Dmg.name(),
                self.declared()
            )));
        }
        Ok(())
    }

    fn keep_tail(&mut self, data: &[u8]) {
        if data.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(data);
            if self.tail.len() > TAIL {
                let extra = self.tail.len() - TAIL;
                self.tail.drain(..extra);
            }
        }
    }

    /// The declaration, as the messages name it.
    fn declared(&self) -> String {
        match self.container {
            ContainerFormat::Ovf => "OVF package".into(),
            ContainerFormat::Bare => self.disk.to_string(),
        }
    }

    /// The one format the declaration allows, if it names one.
    fn expected(&self) -> Option<Probed> {
        match (self.container, self.disk) {
            (ContainerFormat::Ovf, _) => Some(Probed::Tar),
            (ContainerFormat::Bare, DiskFormat::Qcow2) => Some(Probed::Qcow2),
            (ContainerFormat::Bare, DiskFormat::Iso) => Some(Probed::Iso),
            (ContainerFormat::Bare, DiskFormat::Raw | DiskFormat::Aki | DiskFormat::Ari) => None,
        }
    }

    fn verdict(&self, eof: bool) -> Verdict {
        if !eof && self.head.len() < PROBE_LEN {
            return Verdict::NeedMore(PROBE_LEN);
        }
        let found = probe(&self.head);
        let expected = self.expected();
        let others: Vec<&str> = found
            .iter()
            .filter(|f| Some(**f) != expected)
            .map(|f| f.name())
            .collect();
        let declared = self.declared();
        match expected {
            None if !others.is_empty() => {
                return Verdict::Reject(mismatch(&others, &declared));
            }
            None => return Verdict::Accept,
            Some(e) if !others.is_empty() && found.contains(&e) => {
                return Verdict::Reject(format!(
                    "the data also reads as {}, besides the declared {declared}: \
                     a file that reads as more than one format is refused",
                    others.join(" and ")
                ));
            }
            Some(_) if !others.is_empty() => {
                return Verdict::Reject(mismatch(&others, &declared));
            }
            Some(_) => {}
        }
        match (self.container, self.disk) {
            (ContainerFormat::Ovf, _) => check_tar(&self.head),
            (_, DiskFormat::Qcow2) => check_qcow2(&self.head),
            (_, DiskFormat::Iso) => check_iso(&self.head),
            _ => Verdict::Accept,
        }
    }

    fn decide(&mut self, eof: bool) -> Result<(), Rejected> {
        let done = match self.verdict(eof) {
            Verdict::Accept => Ok(()),
            Verdict::Reject(why) => Err(Rejected(why)),
            Verdict::NeedMore(n) if n > MAX_HEAD || self.head.len() >= MAX_HEAD => Err(Rejected(
                format!("the {} header is larger than {MAX_HEAD} bytes", self.disk),
            )),
            Verdict::NeedMore(n) if !eof => {
                self.need = n;
                return Ok(());
            }
            Verdict::NeedMore(_) => match self.container {
                ContainerFormat::Ovf => Err(Rejected(
                    "the data is too short to be an OVF package (a tar archive)".into(),
                )),
                ContainerFormat::Bare => Err(Rejected(format!(
                    "the data is too short to be a {} image",
                    self.disk
                ))),
            },
        };
        // Free the head: nothing more is needed from it.
        self.head = Vec::new();
        self.decided = Some(done.clone());
        done
    }
}

fn mismatch(found: &[&str], declared: &str) -> String {
    format!(
        "the data reads as {}, not as the declared {declared}; declare its real format",
        found.join(" and ")
    )
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
    if head.len() < TAR_BLOCK {
        return Verdict::NeedMore(TAR_BLOCK);
    }
    if tar_header(head) {
        Verdict::Accept
    } else {
        Verdict::Reject("an OVF package must be a tar archive (OVA): no valid tar header".into())
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

    /// A ustar header for `name` with a correct checksum, as tar writes it.
    fn tar_block(name: &str) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(b"00000000013\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        seal_tar(&mut h);
        h
    }

    fn seal_tar(h: &mut [u8]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h[..512].iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn ovf(data: &[u8]) -> Result<(), Rejected> {
        let mut i = Inspector::new(DiskFormat::Raw, ContainerFormat::Ovf);
        i.feed(data).and_then(|()| i.finish())
    }

    #[test]
    fn ovf_must_be_a_tar_with_a_valid_checksum() {
        let mut tar = tar_block("disk.ovf");
        tar.resize(10240, 0);
        assert_eq!(ovf(&tar), Ok(()));
        assert!(ovf(&[0u8; 1024]).is_err());
        let mut bad = tar.clone();
        bad[0] = b'X'; // the checksum no longer matches
        assert!(ovf(&bad).unwrap_err().0.contains("tar"));
    }

    #[test]
    fn every_qemu_format_is_probed_whatever_the_declaration() {
        let mut vdi = vec![0u8; 512];
        vdi[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        vdi[64..68].copy_from_slice(&VDI_SIGNATURE.to_le_bytes());
        let cases: Vec<(Vec<u8>, Probed)> = vec![
            (qcow2_v3(0, &[]), Probed::Qcow2),
            (b"QFI\xfb\0\0\0\x01".to_vec(), Probed::Qcow),
            (b"QED\0rest".to_vec(), Probed::Qed),
            (b"KDMV\x01\0\0\0".to_vec(), Probed::Vmdk),
            (b"COWD\x01\0\0\0".to_vec(), Probed::Vmdk),
            (b"# Disk DescriptorFile\nversion=1\n".to_vec(), Probed::Vmdk),
            (
                b"  \r\n# c\nversion=2\r\nCID=fffffffe\n".to_vec(),
                Probed::Vmdk,
            ),
            (b"conectix\0\0\0\x02".to_vec(), Probed::Vhd),
            (b"vhdxfile".to_vec(), Probed::Vhdx),
            (b"LUKS\xba\xbe\0\x02".to_vec(), Probed::Luks),
            (vdi, Probed::Vdi),
            (b"WithoutFreeSpace\x02\0\0\0".to_vec(), Probed::Parallels),
            (b"WithouFreSpacExt\x02\0\0\0".to_vec(), Probed::Parallels),
            (b"Bochs Virtual HD Image\0\0".to_vec(), Probed::Bochs),
            (CLOOP_MAGIC.to_vec(), Probed::Cloop),
            (tar_block("x"), Probed::Tar),
        ];
        for (mut data, want) in cases {
            data.resize(64 * 1024, 0);
            assert_eq!(probe(&data), vec![want], "{want:?}");
            for (disk, container) in [
                (DiskFormat::Raw, ContainerFormat::Bare),
                (DiskFormat::Aki, ContainerFormat::Bare),
                (DiskFormat::Iso, ContainerFormat::Bare),
                (DiskFormat::Qcow2, ContainerFormat::Ovf),
            ] {
                if want == Probed::Tar && container == ContainerFormat::Ovf {
                    continue;
                }
                let mut i = Inspector::new(disk, container);
                let e = i.feed(&data).and_then(|()| i.finish()).unwrap_err();
                assert!(e.0.contains(want.name()), "{want:?} as {disk}: {e}");
            }
        }
        // Text that merely mentions a version is not a VMDK descriptor.
        assert!(probe(b"hello\nversion=1\n").is_empty());
    }

    #[test]
    fn polyglots_are_refused_whichever_format_is_declared() {
        // A qcow2 naming a backing file that also carries an ISO 9660
        // volume descriptor: declared iso it must not pass.
        let mut q = qcow2_v3(0, &[]);
        q[8..16].copy_from_slice(&512u64.to_be_bytes());
        q[16..20].copy_from_slice(&11u32.to_be_bytes());
        q[512..523].copy_from_slice(b"/etc/shadow");
        q.resize(64 * 1024, 0);
        q[ISO_MAGIC_AT - 1] = 1;
        q[ISO_MAGIC_AT..ISO_MAGIC_AT + 5].copy_from_slice(ISO_MAGIC);
        assert_eq!(probe(&q), vec![Probed::Qcow2, Probed::Iso]);
        let e = inspect(DiskFormat::Iso, &q, 4096).unwrap_err();
        assert!(e.0.contains("also reads as qcow2"), "{e}");
        let e = inspect(DiskFormat::Qcow2, &q, 4096).unwrap_err();
        assert!(e.0.contains("also reads as ISO 9660"), "{e}");
        // A clean qcow2 whose first block is also a valid tar header.
        let mut q = qcow2_v3(0, &[]);
        q[257..263].copy_from_slice(b"ustar\0");
        seal_tar(&mut q);
        q.resize(64 * 1024, 0);
        assert_eq!(probe(&q), vec![Probed::Qcow2, Probed::Tar]);
        let e = ovf(&q).unwrap_err();
        assert!(e.0.contains("qcow2"), "{e}");
        assert!(inspect(DiskFormat::Qcow2, &q, 4096).is_err());
    }

    #[test]
    fn a_dmg_trailer_is_seen_at_the_end() {
        let mut d = vec![0u8; 100_000];
        let at = d.len() - 512;
        d[at..at + 4].copy_from_slice(DMG_TRAILER);
        for chunk in [100, 511, 512, 4096, 100_000] {
            let e = inspect(DiskFormat::Raw, &d, chunk).unwrap_err();
            assert!(e.0.contains("DMG"), "{chunk}: {e}");
        }
        d.push(0);
        assert_eq!(inspect(DiskFormat::Raw, &d, 1000), Ok(()));
    }
}

//! Command-line parsing: clap for the flags, and qemu's `key=value,...` language for `--disk`.

use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;
use imgblock::options::{parse_bool, parse_size, split_opts};
use imgblock::Format;

use crate::virtio::block::{DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE};
use crate::virtio::throttle::{Limit, Limits};

/// Most request queues a disk may have (`num_queues=`).
pub const MAX_QUEUES: u16 = 16;

/// Longest serial the virtio-blk GET_ID request can return (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL_LEN: usize = 20;
/// Most vCPUs; the MADT and APIC IDs stay below 255.
pub const MAX_CPUS: u8 = 64;

/// A KVM virtual machine monitor that boots Linux (bzImage or ELF vmlinux) and serves
/// virtio-blk disks from any image the imgblock library opens.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Args {
    /// Kernel to boot: a bzImage, entered through its 64-bit entry (Linux boot protocol, zero
    /// page); or an ELF vmlinux, entered through its PVH entry (32-bit, hvm_start_info) when it
    /// has a XEN_ELFNOTE_PHYS32_ENTRY note, else through its 64-bit entry. With VMM_REPORT set
    /// in the environment the set-up line on stderr names the entry used.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initramfs loaded into guest memory and announced in the zero page (or as PVH module 0).
    /// Also spelt --initramfs, as Cloud Hypervisor does.
    #[arg(long, value_name = "PATH", alias = "initramfs")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `virtio_mmio.device=` entries for each disk are appended.
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0 reboot=k panic=1"
    )]
    pub cmdline: String,
    /// Guest memory, with qemu's suffixes (k, M, G; plain number = bytes). Cloud Hypervisor's
    /// size=SIZE is taken too, with shared=off and hugepages=off (what this VMM gives).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    pub memory: u64,
    /// Number of vCPUs (each a host thread). Cloud Hypervisor's boot=N is taken too, with
    /// max=N equal to it (no vCPU hot-plug).
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    pub cpus: u8,
    /// A virtio-blk disk; repeat for more. Keys: path=IMG (required), format=raw|qcow2|...
    /// (probed when absent), readonly=on|off, snapshot=on|off (writes go to a temporary qcow2
    /// overlay deleted on exit), cache=writeback|none|unsafe|directsync, discard=ignore|unmap,
    /// detect-zeroes=off|on|unmap (as qemu: writes of zeroes become write-zeroes requests, with
    /// unmap also freeing the space when discard=unmap),
    /// serial=ID (at most 20 bytes, returned by GET_ID), id=NAME (the disk's name in the API's
    /// vm.counters and vm.info, unique; _diskN by default), num_queues=N (request queues, each
    /// served by its own I/O thread; 1 to 16, default 1), queue_size=N (descriptors per queue,
    /// a power of two from 4 to 1024, default 256), direct=on (Cloud Hypervisor's
    /// cache=none), encrypt.key-secret=ID (key-secret=ID
    /// for a luks image; backing.encrypt.key-secret=ID for the image below, and so on) naming an
    /// --object secret. I/O limits for all the disk's queues together, as qemu spells them:
    /// throttling.bps-total=BYTES and throttling.iops-total=N a second, bursts of a tenth of
    /// that or throttling.bps-total-max= / throttling.iops-total-max=; or as Cloud Hypervisor
    /// does: bw_size=BYTES,bw_refill_time=MS and ops_size=N,ops_refill_time=MS. A comma inside
    /// a value is written ",,".
    #[arg(long, value_name = "path=IMG[,KEY=VALUE...]", value_parser = DiskSpec::from_str)]
    pub disk: Vec<DiskSpec>,
    /// A secret for encrypted disks, as qemu takes it: secret,id=ID,data=STRING or
    /// secret,id=ID,file=PATH, with format=raw (default) or base64. May be repeated. A wrong
    /// LUKS passphrase is refused; legacy AES (encrypt.format=aes) cannot detect one.
    #[arg(long = "object", value_name = "secret,id=ID,data=STRING|file=PATH")]
    pub objects: Vec<String>,
    /// Where COM1 goes: stdio, pty, file:PATH, or none. With stdio, standard input is the guest's
    /// keyboard; a terminal is put in raw mode (Ctrl-C goes to the guest) and restored on exit,
    /// and Ctrl-A is the escape key as in qemu: Ctrl-A x stops the VMM (disks flushed and
    /// closed), Ctrl-A Ctrl-A sends Ctrl-A, Ctrl-A h lists the keys. SIGTERM, SIGINT and SIGHUP
    /// stop it the same way. With pty, a new pseudo-terminal is the console (raw, no escape
    /// keys), its path printed on stderr and given by vm.info; attach with `screen PATH`.
    #[arg(long, value_name = "stdio|pty|file:PATH|none", default_value = "stdio",
          value_parser = SerialSpec::from_str)]
    pub serial: SerialSpec,
    /// Cloud Hypervisor's virtio console. This VMM has none: the guest's console is the serial
    /// port. So only off (or null) is taken, as scripts that put the console on the serial
    /// port write it (`--console off --serial tty`).
    #[arg(long, value_name = "off", value_parser = parse_console)]
    pub console: Option<String>,
    /// Seccomp filters, as Cloud Hypervisor's flag: true (default) confines every thread to
    /// the system calls its work needs and stops the VMM with a message on any other; log lets
    /// other calls through and has the kernel log them; false installs no filter.
    #[arg(long, value_name = "true|false|log", default_value = "true",
          value_parser = crate::seccomp::Mode::from_str)]
    pub seccomp: crate::seccomp::Mode,
    /// A control socket speaking Cloud Hypervisor's HTTP API (vmm.ping, vm.info, vm.counters,
    /// vm.pause, vm.resume, vm.power-button, vm.shutdown, vmm.shutdown), so
    /// `ch-remote --api-socket PATH` works.
    /// Written PATH or path=PATH; a stale socket left there is replaced.
    #[arg(long, value_name = "PATH", value_parser = parse_api_socket)]
    pub api_socket: Option<PathBuf>,
}

fn parse_console(s: &str) -> Result<String, String> {
    match s {
        "off" | "null" => Ok(s.to_owned()),
        _ => Err(format!(
            "'{s}': there is no virtio console; the guest's console is the serial port \
             (--serial, console=ttyS0), so only --console off is taken"
        )),
    }
}

fn parse_api_socket(s: &str) -> Result<PathBuf, String> {
    let p = s.strip_prefix("path=").unwrap_or(s);
    if p.is_empty() {
        return Err("an empty socket path".into());
    }
    Ok(PathBuf::from(p))
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    let count = |v: &str| {
        v.parse::<u8>()
            .ok()
            .filter(|n| (1..=MAX_CPUS).contains(n))
            .ok_or_else(|| format!("'{s}': expected a number of vCPUs from 1 to {MAX_CPUS}"))
    };
    if !s.contains('=') {
        return count(s);
    }
    // Cloud Hypervisor's boot=N[,max=M]: vCPUs are not hot-plugged here, so max must be boot.
    let (mut boot, mut max) = (None, None);
    for (k, v) in split_opts(s).map_err(|e| e.to_string())? {
        match k.as_str() {
            "boot" => boot = Some(count(&v)?),
            "max" => max = Some(count(&v)?),
            _ => {
                return Err(format!(
                    "'{s}': unknown --cpus option '{k}' (expected boot=N and max=N)"
                ))
            }
        }
    }
    let boot = boot.ok_or_else(|| format!("'{s}': boot=N is required"))?;
    match max {
        Some(m) if m != boot => Err(format!(
            "'{s}': max={m} would leave room for vCPU hot-plug, which this VMM does not offer; \
             give max equal to boot or leave it out"
        )),
        _ => Ok(boot),
    }
}

fn parse_memory(s: &str) -> Result<u64, String> {
    // A bare number means MiB for qemu's -m; here it means bytes unless suffixed, like
    // qemu-img sizes. Require at least 16 MiB: the boot structures and a kernel need room.
    let size = if s.contains('=') {
        // Cloud Hypervisor's size=SIZE[,shared=off][,hugepages=off]: what they default to is
        // what this VMM does; shared or huge-page memory it does not offer.
        let mut size = None;
        for (k, v) in split_opts(s).map_err(|e| e.to_string())? {
            match k.as_str() {
                "size" => size = Some(v),
                "shared" | "hugepages" => {
                    if parse_bool(&k, &v).map_err(|e| e.to_string())? {
                        return Err(format!(
                            "'{s}': {k}=on is not offered: guest memory is private anonymous \
                             memory in normal pages"
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "'{s}': unknown --memory option '{k}' (expected size=SIZE, shared=off, \
                         hugepages=off)"
                    ))
                }
            }
        }
        size.ok_or_else(|| format!("'{s}': size=SIZE is required"))?
    } else {
        s.to_owned()
    };
    let v = parse_size(&size).map_err(|e| e.to_string())?;
    if v < 16 << 20 {
        return Err(format!("guest memory {size} is below the 16 MiB minimum"));
    }
    if v > 1 << 40 {
        return Err(format!("guest memory {size} is above the 1 TiB maximum"));
    }
    Ok(v)
}

/// Where FLUSH goes and how writes reach the disk (qemu's `cache=` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Writes land in the host page cache; FLUSH makes them durable (qemu's default).
    #[default]
    Writeback,
    /// As writeback for the guest (FLUSH honoured), with the image files opened O_DIRECT so
    /// that aligned I/O bypasses the host page cache.
    None,
    /// FLUSH is ignored: fastest, and unsafe if the host crashes.
    Unsafe,
    /// Every write is flushed before it completes.
    DirectSync,
}

/// What DISCARD does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Accept and ignore discard requests (qemu's default).
    #[default]
    Ignore,
    /// Pass discards to the image (punch holes / free clusters).
    Unmap,
}

/// qemu's `detect-zeroes`: what a write of nothing but zeroes becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Written as given (qemu's default).
    #[default]
    Off,
    /// A write-zeroes request: the image may record zeroes without storing them.
    On,
    /// As `On`, and the space may be freed when discard=unmap (else as `On`).
    Unmap,
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    /// The image.
    pub path: PathBuf,
    /// Its format; probed when `None`.
    pub format: Option<Format>,
    /// Offer VIRTIO_BLK_F_RO and refuse writes.
    pub readonly: bool,
    /// Send writes to a temporary overlay.
    pub snapshot: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// Discard mode.
    pub discard: DiscardMode,
    /// Zero-write detection.
    pub detect_zeroes: DetectZeroes,
    /// GET_ID answer.
    pub serial: Option<String>,
    /// The name `vm.counters` and `vm.info` give the disk (Cloud Hypervisor's `id=`); `_diskN`
    /// when absent.
    pub id: Option<String>,
    /// Request queues (VIRTIO_BLK_F_MQ above 1), each with its own I/O thread.
    pub num_queues: u16,
    /// Descriptors per queue offered to the driver (`queue_size=`).
    pub queue_size: u16,
    /// `(depth in the chain, secret ID)` for each `[backing.]*[encrypt.]key-secret=` key; depth
    /// 0 is the image itself.
    pub key_secrets: Vec<(usize, String)>,
    /// I/O limits (`throttling.bps-total=`, `throttling.iops-total=`, or Cloud Hypervisor's
    /// `bw_size=`/`ops_size=` with their refill times).
    pub throttle: Limits,
}

impl FromStr for DiskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = DiskSpec {
            path: PathBuf::new(),
            format: None,
            readonly: false,
            snapshot: false,
            cache: CacheMode::default(),
            discard: DiscardMode::default(),
            detect_zeroes: DetectZeroes::default(),
            serial: None,
            id: None,
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            key_secrets: Vec::new(),
            throttle: Limits::default(),
        };
        let mut have_path = false;
        // throttling.bps-total, -max, iops-total, -max, bw_size, bw_refill_time, ops_size,
        // ops_refill_time.
        let mut limits = [None::<u64>; 8];
        for (k, v) in split_opts(s).map_err(|e| e.to_string())? {
            let mut key = k.as_str();
            let mut depth = 0;
            while let Some(rest) = key.strip_prefix("backing.") {
                key = rest;
                depth += 1;
            }
            if matches!(key, "encrypt.key-secret" | "key-secret") {
                if v.is_empty() {
                    return Err(format!("{k}= is empty"));
                }
                spec.key_secrets.push((depth, v));
                continue;
            }
            match k.as_str() {
                "path" | "file" => {
                    if v.is_empty() {
                        return Err("path= is empty".into());
                    }
                    spec.path = PathBuf::from(v);
                    have_path = true;
                }
                "format" => spec.format = Some(v.parse().map_err(|e: imgblock::Error| e.to_string())?),
                "readonly" => spec.readonly = parse_bool(&k, &v).map_err(|e| e.to_string())?,
                "snapshot" => spec.snapshot = parse_bool(&k, &v).map_err(|e| e.to_string())?,
                "cache" => {
                    spec.cache = match v.as_str() {
                        "writeback" => CacheMode::Writeback,
                        "none" => CacheMode::None,
                        "unsafe" => CacheMode::Unsafe,
                        "directsync" => CacheMode::DirectSync,
                        _ => {
                            return Err(format!(
                                "cache={v}: expected writeback, none, unsafe or directsync"
                            ))
                        }
                    }
                }
                "discard" => {
                    spec.discard = match v.as_str() {
                        "ignore" | "off" => DiscardMode::Ignore,
                        "unmap" | "on" => DiscardMode::Unmap,
                        _ => return Err(format!("discard={v}: expected ignore or unmap")),
                    }
                }
                "detect-zeroes" | "detect_zeroes" => {
                    spec.detect_zeroes = match v.as_str() {
                        "off" => DetectZeroes::Off,
                        "on" => DetectZeroes::On,
                        "unmap" => DetectZeroes::Unmap,
                        _ => return Err(format!("{k}={v}: expected off, on or unmap")),
                    }
                }
                "serial" => {
                    if v.len() > MAX_SERIAL_LEN {
                        return Err(format!(
                            "serial={v} is {} bytes; virtio-blk IDs hold at most {MAX_SERIAL_LEN}",
                            v.len()
                        ));
                    }
                    spec.serial = Some(v);
                }
                "id" => {
                    if v.is_empty() || v.len() > 64 || !v.chars().all(|c| c.is_ascii_graphic()) {
                        return Err(format!(
                            "id={v}: expected 1 to 64 printable characters, no spaces"
                        ));
                    }
                    spec.id = Some(v);
                }
                // Cloud Hypervisor's spelling of cache=none.
                "direct" => {
                    spec.cache = if parse_bool(&k, &v).map_err(|e| e.to_string())? {
                        CacheMode::None
                    } else {
                        CacheMode::Writeback
                    };
                }
                "num_queues" | "num-queues" => {
                    spec.num_queues = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUES).contains(n))
                        .ok_or_else(|| {
                            format!("{k}={v}: expected a number of queues from 1 to {MAX_QUEUES}")
                        })?;
                }
                // Cloud Hypervisor's spelling, and qemu's virtio-blk property.
                "queue_size" | "queue-size" => {
                    spec.queue_size = v
                        .parse()
                        .ok()
                        .filter(|n: &u16| n.is_power_of_two() && (4..=MAX_QUEUE_SIZE).contains(n))
                        .ok_or_else(|| {
                            format!("{k}={v}: expected a power of two from 4 to {MAX_QUEUE_SIZE}")
                        })?;
                }
                "help" => return Err(format!("keys: path, format, readonly, snapshot, cache, discard, detect-zeroes, serial, id, num_queues, queue_size, encrypt.key-secret, {}", THROTTLE_KEYS.join(", "))),
                _ => {
                    let Some(i) = THROTTLE_KEYS.iter().position(|t| *t == k) else {
                        return Err(format!(
                            "unknown disk option '{k}' (expected path, format, readonly, snapshot, cache, discard, detect-zeroes, serial, id, num_queues, queue_size, encrypt.key-secret or {})",
                            THROTTLE_KEYS.join(", ")
                        ));
                    };
                    let n = parse_size(&v)
                        .map_err(|e| format!("{k}={v}: {e}"))?;
                    limits[i] = Some(n);
                }
            }
        }
        if !have_path {
            return Err("path=IMG is required".into());
        }
        spec.throttle = throttle_limits(&limits)?;
        Ok(spec)
    }
}

/// The throttling keys, qemu's then Cloud Hypervisor's, in the order `throttle_limits` reads
/// them.
const THROTTLE_KEYS: [&str; 8] = [
    "throttling.bps-total",
    "throttling.bps-total-max",
    "throttling.iops-total",
    "throttling.iops-total-max",
    "bw_size",
    "bw_refill_time",
    "ops_size",
    "ops_refill_time",
];

/// The limits the throttling keys give, refusing a half-given or doubly-given one.
fn throttle_limits(v: &[Option<u64>; 8]) -> Result<Limits, String> {
    let one = |qemu: (Option<u64>, Option<u64>), ch: (Option<u64>, Option<u64>), what: &str| {
        let (rate, max) = qemu;
        let (size, refill) = ch;
        match (rate, size) {
            (Some(_), Some(_)) => Err(format!(
                "{what}: give throttling.* or Cloud Hypervisor's *_size/*_refill_time, not both"
            )),
            (Some(r), None) => {
                if refill.is_some() {
                    return Err(format!("{what}: a refill time needs its size"));
                }
                if r == 0 {
                    return Err(format!("{what}: a rate of 0 is no limit; leave it out"));
                }
                Ok(Limit::per_second(r, max))
            }
            (None, Some(s)) => {
                if max.is_some() {
                    return Err(format!("{what}: a -max needs its rate"));
                }
                let Some(ms) = refill else {
                    return Err(format!("{what}: a size needs its refill time (ms)"));
                };
                Limit::refilled(s, ms)
                    .map(Some)
                    .ok_or_else(|| format!("{what}: size and refill time must be above 0"))
            }
            (None, None) if max.is_some() || refill.is_some() => Err(format!(
                "{what}: a -max or refill time needs a rate or size"
            )),
            (None, None) => Ok(None),
        }
    };
    Ok(Limits {
        bytes: one((v[0], v[1]), (v[4], v[5]), "bytes limit")?,
        ops: one((v[2], v[3]), (v[6], v[7]), "requests limit")?,
    })
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// The VMM's standard output.
    Stdio,
    /// A file, created or truncated.
    File(PathBuf),
    /// A new pseudo-terminal, its path printed on stderr and in `vm.info`.
    Pty,
    /// Discarded.
    None,
}

impl FromStr for SerialSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            // tty and off are Cloud Hypervisor's names, file=PATH its spelling.
            "stdio" | "tty" => Ok(SerialSpec::Stdio),
            "none" | "off" | "null" => Ok(SerialSpec::None),
            "pty" => Ok(SerialSpec::Pty),
            _ => match s.strip_prefix("file:").or_else(|| s.strip_prefix("file=")) {
                Some(p) if !p.is_empty() => Ok(SerialSpec::File(PathBuf::from(p))),
                _ => Err(format!("'{s}': expected stdio, pty, file:PATH or none")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn disk_spec_all_keys_parse() {
        let d: DiskSpec =
            "path=/a,,b.qcow2,format=qcow2,readonly=on,snapshot=on,cache=unsafe,discard=unmap,serial=abc,num_queues=4"
                .parse()
                .unwrap();
        assert_eq!(d.num_queues, 4);
        assert_eq!(d.path, PathBuf::from("/a,b.qcow2"));
        assert_eq!(d.format, Some(Format::Qcow2));
        assert!(d.readonly && d.snapshot);
        assert_eq!(d.cache, CacheMode::Unsafe);
        assert_eq!(d.discard, DiscardMode::Unmap);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        let d: DiskSpec = "path=x,encrypt.key-secret=s0,backing.backing.key-secret=s1"
            .parse()
            .unwrap();
        assert_eq!(d.key_secrets, [(0, "s0".to_owned()), (2, "s1".to_owned())]);
    }

    #[test]
    fn disk_throttling_in_qemu_and_cloud_hypervisor_spellings() {
        let d: DiskSpec = "path=a,throttling.bps-total=10M,throttling.iops-total=500"
            .parse()
            .unwrap();
        let b = d.throttle.bytes.unwrap();
        assert_eq!(b.rate, 10.0 * 1024.0 * 1024.0);
        assert_eq!(b.burst, b.rate / 10.0);
        let o = d.throttle.ops.unwrap();
        assert_eq!((o.rate, o.burst), (500.0, 50.0));
        let d: DiskSpec = "path=a,throttling.bps-total=1000,throttling.bps-total-max=4000"
            .parse()
            .unwrap();
        assert_eq!(d.throttle.bytes.unwrap().burst, 4000.0);
        assert!(d.throttle.ops.is_none());
        let d: DiskSpec = "path=a,bw_size=1M,bw_refill_time=500,ops_size=100,ops_refill_time=10"
            .parse()
            .unwrap();
        let b = d.throttle.bytes.unwrap();
        assert_eq!((b.rate, b.burst), (2.0 * 1024.0 * 1024.0, 1024.0 * 1024.0));
        let o = d.throttle.ops.unwrap();
        assert_eq!((o.rate, o.burst), (10000.0, 100.0));
        assert!(!"path=a".parse::<DiskSpec>().unwrap().throttle.any());
        for bad in [
            "path=a,bw_size=1M",
            "path=a,bw_refill_time=10",
            "path=a,throttling.bps-total-max=10",
            "path=a,throttling.bps-total=0",
            "path=a,throttling.bps-total=1M,bw_size=1M,bw_refill_time=1",
            "path=a,ops_size=0,ops_refill_time=10",
            "path=a,throttling.iops-total=x",
            "path=a,throttling.bps-total=1M,bw_refill_time=5",
        ] {
            assert!(bad.parse::<DiskSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_id_names_the_disk() {
        let d: DiskSpec = "path=a,id=data0".parse().unwrap();
        assert_eq!(d.id.as_deref(), Some("data0"));
        assert_eq!("path=a".parse::<DiskSpec>().unwrap().id, None);
        for bad in [
            "path=a,id=",
            "path=a,id=a b",
            &format!("path=a,id={}", "x".repeat(65)),
        ] {
            assert!(bad.parse::<DiskSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_detect_zeroes_as_qemu() {
        for (v, want) in [
            ("off", DetectZeroes::Off),
            ("on", DetectZeroes::On),
            ("unmap", DetectZeroes::Unmap),
        ] {
            let d: DiskSpec = format!("path=a,detect-zeroes={v}").parse().unwrap();
            assert_eq!(d.detect_zeroes, want);
        }
        let d: DiskSpec = "path=a".parse().unwrap();
        assert_eq!(d.detect_zeroes, DetectZeroes::Off);
        assert!("path=a,detect-zeroes=yes".parse::<DiskSpec>().is_err());
    }

    #[test]
    fn disk_spec_defaults_match_qemu() {
        // Short-form booleans, as QemuOpts reads them.
        let d: DiskSpec = "path=x.img,readonly,nosnapshot".parse().unwrap();
        assert!(d.readonly && !d.snapshot);
        let d: DiskSpec = "path=x.img".parse().unwrap();
        assert_eq!(d.format, None);
        assert!(!d.readonly && !d.snapshot);
        assert_eq!(d.cache, CacheMode::Writeback);
        assert_eq!(d.discard, DiscardMode::Ignore);
        assert_eq!(d.num_queues, 1);
        assert_eq!(d.queue_size, 256);
        let d: DiskSpec = "path=x.img,queue_size=128".parse().unwrap();
        assert_eq!(d.queue_size, 128);
        let d: DiskSpec = "path=x.img,queue-size=1024".parse().unwrap();
        assert_eq!(d.queue_size, 1024);
    }

    #[test]
    fn disk_spec_bad_input_clear_errors() {
        for (s, want) in [
            ("format=raw", "path=IMG is required"),
            ("path=x,cache=fast", "cache=fast"),
            ("path=x,discard=maybe", "discard=maybe"),
            ("path=x,readonly=perhaps", "readonly"),
            ("path=x,colour=blue", "unknown disk option 'colour'"),
            ("path=x,serial=123456789012345678901", "at most 20"),
            ("path=x,format=floppy", "floppy"),
            ("path=x,num_queues=0", "from 1 to 16"),
            ("path=x,num_queues=17", "from 1 to 16"),
            ("path=x,num-queues=two", "num-queues=two"),
            ("path=x,queue_size=100", "power of two from 4 to 1024"),
            ("path=x,queue_size=2", "power of two from 4 to 1024"),
            ("path=x,queue_size=2048", "power of two from 4 to 1024"),
            ("path=x,queue_size=0", "power of two from 4 to 1024"),
            // As QemuOpts: a bare `noX` is `X=off`.
            ("path=x,novalue", "unknown disk option 'value'"),
            ("path=x,encrypt.key-secret=", "encrypt.key-secret= is empty"),
            (
                "path=x,backing.colour=blue",
                "unknown disk option 'backing.colour'",
            ),
        ] {
            let e = s.parse::<DiskSpec>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn serial_spec_parses() {
        assert_eq!("stdio".parse::<SerialSpec>().unwrap(), SerialSpec::Stdio);
        assert_eq!("none".parse::<SerialSpec>().unwrap(), SerialSpec::None);
        assert_eq!(
            "file:/tmp/x".parse::<SerialSpec>().unwrap(),
            SerialSpec::File("/tmp/x".into())
        );
        assert!("file:".parse::<SerialSpec>().is_err());
        assert!("tcp:1".parse::<SerialSpec>().is_err());
        assert_eq!("pty".parse::<SerialSpec>().unwrap(), SerialSpec::Pty);
    }

    #[test]
    fn cloud_hypervisor_spellings_are_taken() {
        let a = Args::try_parse_from([
            "vmm",
            "--kernel",
            "k",
            "--initramfs",
            "i.img",
            "--memory",
            "size=1G",
            "--cpus",
            "boot=2",
            "--serial",
            "tty",
            "--disk",
            "path=d.raw,direct=on",
        ])
        .unwrap();
        assert_eq!(a.initrd, Some(PathBuf::from("i.img")));
        assert_eq!((a.memory, a.cpus), (1 << 30, 2));
        assert_eq!(a.serial, SerialSpec::Stdio);
        assert_eq!(a.disk[0].cache, CacheMode::None);
        assert_eq!("off".parse::<SerialSpec>().unwrap(), SerialSpec::None);
        assert_eq!(
            "file=/tmp/x".parse::<SerialSpec>().unwrap(),
            SerialSpec::File("/tmp/x".into())
        );
        let off = [
            "vmm",
            "--kernel",
            "k",
            "--console",
            "off",
            "--serial",
            "tty",
        ];
        let a = Args::try_parse_from(off).unwrap();
        assert_eq!(a.serial, SerialSpec::Stdio);
        for bad in ["tty", "pty", "file=/tmp/c"] {
            let e = Args::try_parse_from(["vmm", "--kernel", "k", "--console", bad]).unwrap_err();
            assert!(e.to_string().contains("no virtio console"), "{e}");
        }
        let d: DiskSpec = "path=x,direct=off".parse().unwrap();
        assert_eq!(d.cache, CacheMode::Writeback);
        assert!("path=x,direct=maybe".parse::<DiskSpec>().is_err());
        for bad in [
            "boot=0",
            "boot=x",
            "max=2",
            "boot=65",
            "boot=2,max=4",
            "boot=2,topology=1:1:2:1",
        ] {
            assert!(
                Args::try_parse_from(["vmm", "--kernel", "k", "--cpus", bad]).is_err(),
                "{bad}"
            );
        }
        for (good, n) in [("boot=2,max=2", 2), ("max=3,boot=3", 3), ("4", 4)] {
            let a = Args::try_parse_from(["vmm", "--kernel", "k", "--cpus", good]).unwrap();
            assert_eq!(a.cpus, n, "{good}");
        }
        let e = Args::try_parse_from(["vmm", "--kernel", "k", "--cpus", "boot=2,max=4"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("hot-plug"), "{e}");
        for (good, n) in [
            ("size=1G,shared=off", 1u64 << 30),
            ("hugepages=off,size=64M", 64 << 20),
            ("size=512M", 512 << 20),
        ] {
            let a = Args::try_parse_from(["vmm", "--kernel", "k", "--memory", good]).unwrap();
            assert_eq!(a.memory, n, "{good}");
        }
        for (bad, want) in [
            ("size=1G,shared=on", "shared=on is not offered"),
            ("size=1G,hugepages=on", "hugepages=on is not offered"),
            (
                "size=1G,mergeable=on",
                "unknown --memory option 'mergeable'",
            ),
            ("shared=off", "size=SIZE is required"),
        ] {
            let e = Args::try_parse_from(["vmm", "--kernel", "k", "--memory", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn args_memory_and_cpus_validated() {
        let a = Args::try_parse_from(["vmm", "--kernel", "k", "--memory", "1G", "--cpus", "4"])
            .unwrap();
        assert_eq!(a.memory, 1 << 30);
        assert_eq!(a.cpus, 4);
        assert!(Args::try_parse_from(["vmm", "--kernel", "k", "--memory", "1M"]).is_err());
        assert!(Args::try_parse_from(["vmm", "--kernel", "k", "--cpus", "0"]).is_err());
        assert!(Args::try_parse_from(["vmm", "--kernel", "k", "--cpus", "65"]).is_err());
        assert!(Args::try_parse_from(["vmm"]).is_err());
    }

    #[test]
    fn help_documents_every_flag() {
        let help = Args::command().render_long_help().to_string();
        for flag in [
            "--kernel",
            "--initrd",
            "--cmdline",
            "--memory",
            "--cpus",
            "--disk",
            "--serial",
            "--object",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        for key in [
            "readonly",
            "snapshot",
            "cache=",
            "discard=",
            "serial=",
            "num_queues=",
            "format=",
            "key-secret=",
        ] {
            assert!(help.contains(key), "{key} missing from --help");
        }
    }
}

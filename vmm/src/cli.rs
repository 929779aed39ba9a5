//! The `ligera` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{
    DEFAULT_CMDLINE, DiskConfig, NetConfig, PvHypercalls, SerialConfig, VmConfig, VsockConfig,
    format_size, parse_size,
};
use crate::options::{parse_disk, parse_net, parse_vsock};

const RUN_EXAMPLES: &str = "\
Examples:
  ligera run --kernel vmlinux --initrd initramfs.cpio
  ligera run --kernel bzImage --cpus 2 --memory 512M --cmdline \"console=ttyS0 reboot=k panic=1\"
  ligera run --kernel vmlinux --serial file=console.log
  ligera run --kernel vmlinux --disk path=rootfs.ext4 --cmdline \"console=ttyS0 reboot=k root=/dev/vda\"
  ligera run --kernel vmlinux --initrd initramfs.cpio --disk path=data.img,readonly=on,id=data \\
      --net tap=tap0,mac=02:00:00:00:00:01 --vsock cid=3,socket=/tmp/vm.sock --rng

Exit status:
  0    the guest rebooted (reset through the keyboard controller, e.g. reboot=k)
  1    ligera failed (bad input, KVM error)
  2    bad command line
  3    the guest kernel panicked (reported through the pvpanic port)
  4    the guest triple-faulted (KVM shutdown exit)
  5    KVM could not run guest code (internal error or failed VM entry)
  128+N  stopped by signal N (130 for Ctrl-C/SIGINT, 143 for SIGTERM)";

/// ligera: a microVM monitor on Linux KVM.
#[derive(Debug, Parser)]
#[command(name = "ligera", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL",
          value_parser = parse_level)]
    pub log_level: log::LevelFilter,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel in a new microVM and run it until it reboots.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Run commands from an image in throwaway microVMs.
    #[command(subcommand)]
    Sandbox(crate::sandbox::SandboxCommand),
    /// The image disks sandboxes use, cached in ~/.cache/ligera.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Run the same workloads in a microVM, a runc container and a bare
    /// process, interleaved, and compare them.
    Bench(crate::bench::BenchArgs),
    /// Save a running microVM to files, or start one from them.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Take Firecracker's command line and serve its API (as a link named
    /// `firecracker` to ligera does).
    Firecracker(crate::firecracker::FirecrackerArgs),
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot the VM served on a control socket (ligera run --api-sock):
    /// pauses it if it runs, writes its state and memory files, and resumes
    /// it if it was running.
    Create(SnapshotCreateArgs),
    /// Start a VM where a snapshot left it, and run it as ligera run does
    /// (same exit statuses).
    Restore(SnapshotRestoreArgs),
}

#[derive(Debug, clap::Args)]
pub struct SnapshotCreateArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Where the state file goes (created or replaced).
    #[arg(long, value_name = "PATH")]
    pub state: PathBuf,
    /// Where the guest memory file goes (created or replaced; sparse).
    #[arg(long, value_name = "PATH")]
    pub memory: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SnapshotRestoreArgs {
    /// The snapshot's state file.
    #[arg(long, value_name = "PATH")]
    pub state: PathBuf,
    /// The snapshot's memory file (mapped copy-on-write: it never changes).
    #[arg(long, value_name = "PATH")]
    pub memory: PathBuf,
    /// Serial console: stdio, file=PATH or none.
    #[arg(long, value_name = "WHERE", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialConfig,
    /// The vsock device's host socket, instead of the snapshotted VM's (two
    /// VMs cannot listen on one path).
    #[arg(long, value_name = "PATH")]
    pub vsock_socket: Option<PathBuf>,
    /// Serve the control API on a Unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    #[arg(long, value_name = "MODE", default_value = "on", help = SECCOMP_HELP)]
    pub seccomp: OnOff,
    #[command(flatten)]
    pub jail: crate::jail::JailOptions,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Fetch and prepare an image (archive, layout, registry reference or
    /// root file system) into the cache; prints its id.
    Pull {
        #[arg(value_name = "REF")]
        reference: String,
    },
    /// List the cached image disks: id, size on disk, last use.
    Ls,
    /// Remove a cached image disk (by id or its end).
    Rm {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Remove every cached image disk.
    Prune,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnOffAuto {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Help for `--seccomp`, shared by `run` and the sandbox commands.
pub const SECCOMP_HELP: &str = "Per-thread seccomp filters: each thread may make only the system \
     calls its role needs, and any other call ends ligera with status 159. off is UNSAFE: a guest \
     that escapes KVM into ligera can then make any system call ligera's user can";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest kernel: ELF vmlinux (64-bit or PVH entry) or bzImage, detected from its content.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial RAM disk, placed at the top of low guest RAM.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line, replacing the default.
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Number of vCPUs (1 to 32).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,

    /// Guest RAM: 512M, 2G, or a plain number of MiB.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,

    /// Serial console: stdio, file=PATH or none.
    #[arg(long, value_name = "WHERE", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialConfig,

    /// Offer KVM's hypercall-based paravirtual features (PV IPI, PV TLB flush,
    /// PV sched-yield, PV unhalt). auto: on, except on hosts whose KVM does not
    /// complete hypercalls (the nested kvm_pvm host).
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub pv_hypercalls: OnOffAuto,

    /// Don't add the guest workarounds for an emulating nested host (kvm_pvm)
    /// to the kernel command line.
    #[arg(long)]
    pub no_host_quirks: bool,

    /// Give the guest a virtio-rng entropy device fed by the host's getrandom.
    #[arg(long)]
    pub rng: bool,

    /// A virtio-blk disk on a raw image: path=IMG[,readonly=on][,id=NAME].
    /// Repeatable; the guest sees them as /dev/vda, /dev/vdb, ... in order.
    #[arg(long, value_name = "OPTIONS", value_parser = parse_disk)]
    pub disk: Vec<DiskConfig>,

    /// A virtio-net interface on a TAP device (opened, or created if it does
    /// not exist): tap=NAME[,mac=MAC]. Repeatable.
    #[arg(long, value_name = "OPTIONS", value_parser = parse_net)]
    pub net: Vec<NetConfig>,

    /// A virtio-vsock device; the host side is a Unix socket with
    /// Firecracker's hybrid-vsock protocol: cid=N,socket=PATH.
    #[arg(long, value_name = "OPTIONS", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,

    /// Serve the control API (HTTP/1.1, JSON) on a Unix socket at PATH:
    /// pause, resume, stop, Ctrl-Alt-Del, state and configuration.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    #[arg(long, value_name = "MODE", default_value = "on", help = SECCOMP_HELP)]
    pub seccomp: OnOff,

    #[command(flatten)]
    pub jail: crate::jail::JailOptions,
}

fn parse_level(text: &str) -> Result<log::LevelFilter, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not one of off, error, warn, info, debug, trace"))
}

fn parse_serial(text: &str) -> Result<SerialConfig, String> {
    match text {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => match text.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
            _ => Err(format!("'{text}' is not stdio, file=PATH or none")),
        },
    }
}

impl RunArgs {
    pub fn into_config(self) -> (VmConfig, crate::jail::JailOptions) {
        let config = VmConfig {
            initrd: self.initrd,
            cmdline: self.cmdline,
            vcpus: self.cpus,
            mem_size: self.memory,
            serial: self.serial,
            pv_hypercalls: match self.pv_hypercalls {
                OnOffAuto::Auto => PvHypercalls::Auto,
                OnOffAuto::On => PvHypercalls::On,
                OnOffAuto::Off => PvHypercalls::Off,
            },
            host_quirks: !self.no_host_quirks,
            rng: self.rng,
            disks: self.disk,
            nets: self.net,
            vsock: self.vsock,
            api_socket: self.api_sock,
            seccomp: self.seccomp == OnOff::On,
            ..VmConfig::new(self.kernel)
        };
        (config, self.jail)
    }
}

/// Describes a config in one line for the log.
pub fn describe(config: &VmConfig) -> String {
    format!(
        "kernel {}, {} vCPU(s), {} RAM",
        config.kernel.display(),
        config.vcpus,
        format_size(config.mem_size)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<VmConfig, clap::Error> {
        let cli = Cli::try_parse_from(args)?;
        match cli.command {
            Command::Run(run) => Ok(run.into_config().0),
            _ => panic!("not a run command"),
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = parse(&["ligera", "run", "--kernel", "k"]).unwrap();
        assert_eq!(c, VmConfig::new("k".into()));
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn all_flags() {
        let c = parse(&[
            "ligera",
            "run",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--cmdline",
            "x=1",
            "--cpus",
            "4",
            "--memory",
            "2G",
            "--serial",
            "file=/tmp/s",
            "--pv-hypercalls",
            "off",
            "--no-host-quirks",
        ])
        .unwrap();
        assert_eq!(c.initrd, Some("i".into()));
        assert_eq!(c.cmdline, "x=1");
        assert_eq!((c.vcpus, c.mem_size), (4, 2 << 30));
        assert_eq!(c.serial, SerialConfig::File("/tmp/s".into()));
        assert_eq!(c.pv_hypercalls, PvHypercalls::Off);
        assert!(!c.host_quirks);
    }

    #[test]
    fn bad_values() {
        for args in [
            &["ligera", "run", "--kernel", "k", "--cpus", "256"][..],
            &["ligera", "run", "--kernel", "k", "--memory", "lots"],
            &["ligera", "run", "--kernel", "k", "--serial", "tcp"],
            &["ligera", "run", "--kernel", "k", "--serial", "file="],
            &["ligera", "run", "--kernel", "k", "--bogus"],
            &["ligera", "run"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}

//! `ligera bench`: the same workload from the same image in a ligera
//! microVM, a runc container and a bare host process, interleaved, with
//! medians, ranges and ratios to the bare process, as a table on the
//! terminal and, on request, JSON and CSV.

mod net;
mod plot;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use runtime::{Kind, Run, Runtime, Setup};

/// Exit status when the bench could not be set up (no image, a scratch
/// directory that cannot be made, an output file that cannot be written).
pub const EXIT_BENCH_ERROR: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Spawn → first output, and spawn → exit, of `echo running`.
    Startup,
    /// `sysbench cpu` for --duration: events per second.
    Cpu,
    /// `sysbench memory` for --duration: MiB/s; then the host memory the
    /// instance costs while it idles.
    Memory,
    /// `fio` with direct I/O on a scratch file: 4 KiB random read and write
    /// IOPS, 1 MiB sequential read and write MB/s.
    Disk,
    /// --density instances started at once: time until all are up, and
    /// their host memory together.
    Density,
    /// iperf3 throughput and TCP request/response round trips between the
    /// host side and the instance (loopback, veth, tap).
    Net,
    /// Part of `startup`, run after it: spawn → a TCP echo server in a new
    /// instance answering the host side.
    #[value(skip)]
    Port,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The image every runtime runs (an OCI layout, an archive, a registry
    /// reference or a root file system directory; default: the busybox
    /// image setup builds).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,

    /// Suites to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["startup", "cpu", "memory", "disk", "net", "density"])]
    pub suite: Vec<Suite>,

    /// Runtimes to compare, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["process", "runc", "vm", "qemu"])]
    pub runtime: Vec<Kind>,

    /// Measured runs of each case per runtime (after the warm-up runs).
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,

    /// Unmeasured runs of each case per runtime before the measured ones.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub warmup: u32,

    /// How long each fixed-time run lasts (cpu): 1s, 10s, 1m.
    #[arg(long, value_name = "DURATION", default_value = "5s",
          value_parser = crate::sandbox::parse_duration)]
    pub duration: Duration,

    /// vCPUs of the VM, and the container's CPU quota.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: u8,

    /// Guest RAM of the VM, and the container's memory limit.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = crate::config::parse_size)]
    pub memory: u64,

    /// Guest kernel of the VM (default: the one setup built).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the results as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,

    /// End a run that takes longer than this (its runtime is then skipped
    /// with the reason); default: 10 minutes, plus 2 per density instance,
    /// plus 10 times --duration.
    #[arg(long, value_name = "DURATION", value_parser = crate::sandbox::parse_duration)]
    pub run_timeout: Option<Duration>,

    /// Instances the density suite starts at once.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub density: u32,

    /// Draw the results as an SVG plot in FILE (a panel per suite and case,
    /// a bar per runtime with its min-max range).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// One figure of one runtime in one case.
#[derive(Debug, Serialize)]
pub struct Figure {
    pub runtime: &'static str,
    /// Every measured run, in order.
    pub runs: Vec<f64>,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// median / the bare process's median.
    pub ratio_to_process: Option<f64>,
    /// Why there is no figure.
    pub skipped: Option<String>,
}

/// One case of a suite, across runtimes.
#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub suite: &'static str,
    pub case: &'static str,
    pub unit: &'static str,
    /// "lower" or "higher".
    pub better: &'static str,
    pub runtimes: Vec<Figure>,
}

#[derive(Debug, Serialize)]
pub struct Host {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    /// The host's KVM emulates guest code (nested `kvm_pvm`).
    pub nested_emulation: bool,
}

#[derive(Debug, Serialize)]
pub struct Settings {
    pub image: String,
    pub runs: u32,
    pub warmup: u32,
    pub duration_s: f64,
    pub cpus: u8,
    pub memory_mib: u64,
    pub density: u32,
}

/// What `--json` writes (schema "ligera-bench/1", see the README).
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub unix_time: u64,
    pub host: Host,
    pub settings: Settings,
    pub warning: Option<String>,
    pub results: Vec<CaseResult>,
}

const NESTED_WARNING: &str = "this host's KVM is nested and emulates guest code: \
     the VM's CPU, memory and I/O figures are not representative of a real KVM host";

/// A case of a suite: its name, unit, which way is better, and how to read
/// its figure from a round's runs (one, or one per density instance).
struct Case {
    name: &'static str,
    unit: &'static str,
    better: &'static str,
    read: fn(&[Run]) -> Result<f64, String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

const MIB: f64 = (1u64 << 20) as f64;

/// The scratch file fio works on, in the disk every runtime has at `/mnt`.
const FIO_FILE: &str = "/mnt/ligera-bench.fio";

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Startup => "startup",
            Suite::Cpu => "cpu",
            Suite::Memory => "memory",
            Suite::Disk => "disk",
            Suite::Density => "density",
            Suite::Net => "net",
            Suite::Port => "startup",
        }
    }

    fn script(self, args: &BenchArgs) -> String {
        let secs = args.duration.as_secs().max(1);
        match self {
            Suite::Startup => "echo running".into(),
            Suite::Cpu => format!("sysbench cpu --time={secs} --threads={} run", args.cpus),
            Suite::Memory => format!(
                "sysbench memory --memory-block-size=1M --memory-total-size=1000T \
                 --time={secs} --threads={} run && echo {} && {{ read x || :; }}",
                args.cpus,
                runtime::READY
            ),
            Suite::Disk => {
                // One fio run, four jobs one after the other (stonewall),
                // on one file; psync, so that every runtime's fio does the
                // same system calls. dd lays the file out in 1 MiB writes:
                // fio's own layout writes it a block at a time, which takes
                // minutes in an emulated guest.
                let job = |name: &str, rw: &str, bs: &str| {
                    format!(" --name={name} --rw={rw} --bs={bs} --stonewall")
                };
                format!(
                    "dd if=/dev/zero of={FIO_FILE} bs=1M count=16 oflag=direct status=none && \
                     fio --output-format=json --filename={FIO_FILE} --size=16M --direct=1 \
                     --ioengine=psync --thread --time_based --runtime={secs}{}{}{}{}; \
                     s=$?; rm -f {FIO_FILE}; exit $s",
                    job("randread", "randread", "4k"),
                    job("randwrite", "randwrite", "4k"),
                    job("seqread", "read", "1M"),
                    job("seqwrite", "write", "1M"),
                )
            }
            Suite::Density => format!("echo {}; read x || :", runtime::READY),
            Suite::Net => net::server_script(),
            Suite::Port => net::port_script(),
        }
    }

    /// Tools the image must have, looked for in its root file system.
    fn needs(self) -> &'static [&'static str] {
        match self {
            Suite::Startup | Suite::Density => &[],
            Suite::Cpu | Suite::Memory => &["sysbench"],
            Suite::Disk => &["fio"],
            Suite::Net => &["iperf3", "socat"],
            Suite::Port => &["socat"],
        }
    }

    /// Whether it measures a running system: the VM's runs go to the
    /// bench's persistent sandbox instead of a new VM each.
    fn in_sandbox(self) -> bool {
        matches!(self, Suite::Cpu | Suite::Memory | Suite::Disk | Suite::Net)
    }

    /// Whether its instances are reached over the bench's network.
    fn net(self) -> bool {
        matches!(self, Suite::Net | Suite::Port)
    }

    /// Whether its runs hold (print READY and wait) to be measured.
    fn hold(self) -> bool {
        matches!(self, Suite::Memory | Suite::Density | Suite::Net)
    }

    fn instances(self, args: &BenchArgs) -> u32 {
        match self {
            Suite::Density => args.density,
            _ => 1,
        }
    }

    fn cases(self) -> Vec<Case> {
        match self {
            Suite::Startup => vec![
                Case {
                    name: "running",
                    unit: "ms",
                    better: "lower",
                    read: |r| {
                        r[0].first_output
                            .map(ms)
                            .ok_or_else(|| "no output".to_string())
                    },
                },
                Case {
                    name: "exit",
                    unit: "ms",
                    better: "lower",
                    read: |r| Ok(ms(r[0].exit)),
                },
            ],
            Suite::Cpu => vec![Case {
                name: "events",
                unit: "events/s",
                better: "higher",
                read: |r| sysbench_figure(&r[0].stdout, "events per second:"),
            }],
            Suite::Memory => vec![
                Case {
                    name: "bandwidth",
                    unit: "MiB/s",
                    better: "higher",
                    read: |r| sysbench_rate(&r[0].stdout),
                },
                Case {
                    name: "instance",
                    unit: "MiB",
                    better: "lower",
                    read: |r| {
                        r[0].memory
                            .map(|b| b as f64 / MIB)
                            .ok_or_else(|| "its memory could not be measured".to_string())
                    },
                },
            ],
            Suite::Disk => vec![
                Case {
                    name: "randread",
                    unit: "IOPS",
                    better: "higher",
                    read: |r| fio_figure(&r[0].stdout, "randread", "read", "iops"),
                },
                Case {
                    name: "randwrite",
                    unit: "IOPS",
                    better: "higher",
                    read: |r| fio_figure(&r[0].stdout, "randwrite", "write", "iops"),
                },
                Case {
                    name: "seqread",
                    unit: "MB/s",
                    better: "higher",
                    read: |r| {
                        fio_figure(&r[0].stdout, "seqread", "read", "bw_bytes").map(|b| b / 1e6)
                    },
                },
                Case {
                    name: "seqwrite",
                    unit: "MB/s",
                    better: "higher",
                    read: |r| {
                        fio_figure(&r[0].stdout, "seqwrite", "write", "bw_bytes").map(|b| b / 1e6)
                    },
                },
            ],
            Suite::Port => vec![Case {
                name: "port",
                unit: "ms",
                better: "lower",
                read: |r| {
                    r[0].port
                        .map(ms)
                        .ok_or_else(|| "the port did not answer".to_string())
                },
            }],
            Suite::Net => vec![
                Case {
                    name: "tcp",
                    unit: "Gbit/s",
                    better: "higher",
                    read: |r| net_figure(&r[0]).map(|(gbits, _)| gbits),
                },
                Case {
                    name: "rtt",
                    unit: "us",
                    better: "lower",
                    read: |r| net_figure(&r[0]).map(|(_, rtt)| rtt),
                },
            ],
            Suite::Density => vec![
                Case {
                    name: "all-up",
                    unit: "ms",
                    better: "lower",
                    read: |r| {
                        let first = r.iter().map(|r| r.start).min().ok_or("no instances")?;
                        r.iter()
                            .map(|r| r.ready.map(|d| ms(r.start + d - first)))
                            .try_fold(0.0f64, |acc, v| v.map(|v| acc.max(v)))
                            .ok_or_else(|| "an instance did not come up".to_string())
                    },
                },
                Case {
                    name: "memory",
                    unit: "MiB",
                    better: "lower",
                    read: |r| {
                        r.iter()
                            .map(|r| r.memory)
                            .try_fold(0u64, |acc, m| m.map(|m| acc + m))
                            .map(|b| b as f64 / MIB)
                            .ok_or_else(|| "an instance's memory could not be measured".into())
                    },
                },
            ],
        }
    }
}

/// The net suite's figures of a run.
fn net_figure(run: &Run) -> Result<(f64, f64), String> {
    run.net
        .clone()
        .unwrap_or_else(|| Err("not measured".into()))
}

/// The number after `label` in sysbench's report.
fn sysbench_figure(out: &[u8], label: &str) -> Result<f64, String> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("no '{label}' in sysbench's output"))
}

/// The rate in sysbench memory's "N MiB transferred (R MiB/sec)".
fn sysbench_rate(out: &[u8]) -> Result<f64, String> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" MiB transferred (")?;
            rest.strip_suffix(" MiB/sec)")?.trim().parse::<f64>().ok()
        })
        .ok_or_else(|| "no 'MiB transferred (... MiB/sec)' in sysbench's output".into())
}

/// `field` of the `dir` ("read"/"write") figures of job `job` in fio's
/// JSON output.
fn fio_figure(out: &[u8], job: &str, dir: &str, field: &str) -> Result<f64, String> {
    let start = out
        .iter()
        .position(|&b| b == b'{')
        .ok_or("no JSON in fio's output")?;
    let v: serde_json::Value = serde_json::from_slice(&out[start..])
        .map_err(|e| format!("fio's output is not JSON: {e}"))?;
    v["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["jobname"] == job))
        .and_then(|j| j[dir][field].as_f64())
        .ok_or_else(|| format!("no {dir} {field} of job {job} in fio's output"))
}

/// Whether `tool` is in the image at `rootfs`.
fn image_has(rootfs: &Path, tool: &str) -> bool {
    ["usr/bin", "bin", "usr/local/bin", "usr/sbin", "sbin"]
        .iter()
        .any(|d| rootfs.join(d).join(tool).exists())
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Waits (at most 10 s) until the VMs of earlier runs are destroyed: their
/// teardown outlives their ligera (see `vm::hand_off_teardown`), and would
/// share the CPUs with the next run.
fn settle() {
    let name = crate::vm::TEARDOWN_NAME.to_bytes();
    let deadline = Instant::now() + Duration::from_secs(10);
    let busy = || {
        std::fs::read_dir("/proc").is_ok_and(|d| {
            d.flatten().any(|e| {
                std::fs::read(e.path().join("comm"))
                    .is_ok_and(|c| c.strip_suffix(b"\n").unwrap_or(&c) == name)
            })
        })
    };
    while busy() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `ligera bench`.
pub fn bench(args: BenchArgs) -> i32 {
    match run_bench(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ligera: bench: error: {e}");
            EXIT_BENCH_ERROR
        }
    }
}

fn run_bench(args: &BenchArgs) -> Result<(), BenchError> {
    let bench_started = Instant::now();
    let mut kinds = args.runtime.clone();
    kinds.sort();
    kinds.dedup();
    let mut suites: Vec<Suite> = Vec::new();
    for &s in &args.suite {
        if !suites.contains(&s) {
            suites.push(s);
            if s == Suite::Startup {
                suites.push(Suite::Port);
            }
        }
    }
    // Loop mounts go in a mount namespace of our own, which goes away with
    // us whatever ends us; done while we still have one thread.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        private_mounts()?;
    }
    let base = crate::sandbox::runtime_dir().join("bench");
    runtime::remove_stale(&base);
    let scratch = base.join(std::process::id().to_string());
    std::fs::create_dir_all(&scratch)
        .map_err(|e| BenchError::Setup(format!("cannot create {}: {e}", scratch.display())))?;
    let _cleanup = Cleanup {
        scratch: scratch.clone(),
        base,
    };
    signals::watch(scratch.clone());

    // The default: the bench image setup builds, else the sandbox's
    // busybox image (whose lack of tools skips the suites that need them).
    let image = match &args.image {
        Some(r) => Some(r.clone()),
        None => bench_image().map(|p| p.display().to_string()),
    };
    if image.is_none() {
        eprintln!(
            "ligera: bench: no bench image in the cache (resources/build-bench-image.sh \
             builds it): using the busybox image"
        );
    }
    let (rootfs, image_name) = image_root(image.as_deref(), &scratch, root)?;
    let (process_root, disk) = if root && suites.contains(&Suite::Disk) {
        disk_mounts(&rootfs, &scratch)?
    } else {
        (rootfs.clone(), None)
    };
    let mut net_problem = None;
    let net = if !suites.contains(&Suite::Net) && !suites.contains(&Suite::Port) {
        None
    } else if !root {
        net_problem = Some("network namespaces need root".to_string());
        None
    } else {
        net::Net::create()
            .map_err(|e| net_problem = Some(format!("cannot make the network: {e}")))
            .ok()
    };
    let setup = Setup {
        net,
        image: image.as_deref().map(crate::image::absolute),
        rootfs,
        process_root,
        disk,
        cpus: args.cpus,
        memory: args.memory,
        kernel: args.kernel.clone(),
        scratch,
    };
    let nested = crate::host::is_emulating_nested_host();
    let mut warnings = Vec::new();
    if nested {
        warnings.push(NESTED_WARNING.to_string());
    }
    if suites.contains(&Suite::Disk) && on_tmpfs(&setup.scratch) {
        warnings.push(format!(
            "the disk suite's files are on tmpfs ({}): its figures are the speed of \
             memory, not of a disk",
            setup.scratch.display()
        ));
    }
    for w in &warnings {
        eprintln!("ligera: bench: warning: {w}");
    }

    let mut runtimes: Vec<Result<Runtime, String>> =
        kinds.iter().map(|&k| Runtime::new(k, &setup)).collect();
    let mut results = Vec::new();
    let warmup = args.warmup;
    for &suite in &suites {
        let cases = suite.cases();
        let missing = suite
            .needs()
            .iter()
            .find(|tool| !image_has(&setup.rootfs, tool))
            .map(|tool| format!("the image has no {tool}"))
            .or_else(|| suite.net().then(|| net_problem.clone()).flatten());
        let script = suite.script(args);
        let instances = suite.instances(args);
        // figures[case][runtime]
        let mut figures: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); kinds.len()]; cases.len()];
        let mut failed: Vec<Option<String>> = runtimes
            .iter()
            .map(|r| r.as_ref().err().cloned().or(missing.clone()))
            .collect();
        for (k, rt) in runtimes.iter_mut().enumerate() {
            if let (Ok(rt), None) = (rt, &failed[k]) {
                let why = match rt.kind {
                    Kind::Process | Kind::Runc if suite == Suite::Disk && setup.disk.is_none() => {
                        Some("the image has no /mnt to mount the scratch disk on".to_string())
                    }
                    Kind::Vm if suite.in_sandbox() => rt.begin(&setup).err(),
                    _ => None,
                };
                failed[k] = why;
            }
        }
        let rounds = warmup + args.runs;
        let total = rounds as usize * kinds.len();
        let mut done = 0usize;
        // Time spent and runs made per runtime, for the time left: a VM's
        // run may take minutes where a process's takes milliseconds.
        let mut spent = vec![Duration::ZERO; kinds.len()];
        let mut made = vec![0u32; kinds.len()];
        for round in 0..rounds {
            // A B C, then B C A, ...: nobody always goes first.
            for i in 0..kinds.len() {
                let k = (i + round as usize) % kinds.len();
                done += 1;
                if failed[k].is_some() {
                    continue;
                }
                let Ok(rt) = runtimes[k].as_mut() else {
                    continue;
                };
                let measured = round >= warmup;
                let left =
                    (0..kinds.len())
                        .filter(|&j| failed[j].is_none())
                        .try_fold(0.0, |acc, j| {
                            (made[j] > 0).then(|| {
                                acc + spent[j].as_secs_f64() / f64::from(made[j])
                                    * f64::from(rounds - made[j])
                            })
                        });
                progress(suite, rt.kind, round, warmup, args.runs, done, total, left);
                let run_started = Instant::now();
                let job = runtime::Job {
                    script: &script,
                    in_sandbox: suite.in_sandbox(),
                    hold: suite.hold(),
                    net: suite.net(),
                };
                settle();
                let mut group = Vec::new();
                for _ in 0..instances {
                    group.push(rt.start(&setup, &job)?);
                }
                let kind = rt.kind;
                let measure = || match &setup.net {
                    Some(n) => net::measure(
                        n,
                        &setup.process_root,
                        net::Net::address(kind),
                        args.duration,
                    ),
                    None => Err("no network".into()),
                };
                let during: Option<&dyn Fn() -> Result<(f64, f64), String>> =
                    (suite == Suite::Net).then_some(&measure);
                // The port case: the host side knocks from the spawn on.
                let knock = match (&setup.net, suite) {
                    (Some(n), Suite::Port) => Some(net::Knock::start(n, kind)?),
                    _ => None,
                };
                let mut runs =
                    runtime::finish(group, suite.hold(), during, run_limit(args, instances))?;
                if let (Some(knock), Some(run)) = (knock, runs.first_mut()) {
                    run.port = knock
                        .answered()
                        .and_then(|at| at.checked_duration_since(run.start));
                }
                spent[k] += run_started.elapsed();
                made[k] += 1;
                if let Some(bad) = runs.iter().find(|r| r.status != 0 || r.timed_out.is_some()) {
                    failed[k] = Some(failure(bad));
                    continue;
                }
                for (c, case) in cases.iter().enumerate() {
                    // The figures come from what the workload printed (a
                    // guest's output is untrusted): finite and not negative.
                    let read = (case.read)(&runs).and_then(|v| {
                        if v.is_finite() && v >= 0.0 {
                            Ok(v)
                        } else {
                            Err(format!("{} is not a {} figure", v, case.unit))
                        }
                    });
                    match read {
                        Ok(v) if measured => figures[c][k].push(v),
                        Ok(_) => {}
                        Err(why) => failed[k] = Some(why),
                    }
                }
            }
        }
        for (c, case) in cases.iter().enumerate() {
            let process_median = kinds
                .iter()
                .position(|&k| k == Kind::Process)
                .filter(|&p| failed[p].is_none())
                .and_then(|p| median(&figures[c][p]));
            let runtimes = kinds
                .iter()
                .enumerate()
                .map(|(k, kind)| {
                    let runs = std::mem::take(&mut figures[c][k]);
                    if let Some(why) = &failed[k] {
                        return Figure {
                            runtime: kind.name(),
                            runs: Vec::new(),
                            median: None,
                            min: None,
                            max: None,
                            ratio_to_process: None,
                            skipped: Some(why.clone()),
                        };
                    }
                    let m = median(&runs);
                    Figure {
                        runtime: kind.name(),
                        median: m,
                        min: runs.iter().copied().reduce(f64::min),
                        max: runs.iter().copied().reduce(f64::max),
                        ratio_to_process: m
                            .zip(process_median)
                            .filter(|(_, p)| *p > 0.0)
                            .map(|(m, p)| m / p),
                        runs,
                        skipped: None,
                    }
                })
                .collect();
            results.push(CaseResult {
                suite: suite.name(),
                case: case.name,
                unit: case.unit,
                better: case.better,
                runtimes,
            });
        }
    }
    for rt in runtimes.iter_mut().flatten() {
        rt.end();
    }
    eprintln!(
        "ligera: bench: done in {:.2} s",
        bench_started.elapsed().as_secs_f64()
    );

    let report = Report {
        schema: "ligera-bench/1",
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        host: host_info(nested),
        settings: Settings {
            image: image_name,
            runs: args.runs,
            warmup,
            duration_s: args.duration.as_secs_f64(),
            cpus: args.cpus,
            memory_mib: args.memory >> 20,
            density: args.density,
        },
        warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
        results,
    };
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| BenchError::Setup(format!("cannot encode the results: {e}")))?;
        write_file(path, &json)?;
    }
    if let Some(path) = &args.csv {
        write_file(path, &csv(&report)?)?;
    }
    if let Some(path) = &args.plot {
        plot::draw(&report, path)?;
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BenchError> {
    std::fs::write(path, bytes)
        .map_err(|e| BenchError::Setup(format!("cannot write {}: {e}", path.display())))
}

/// How long one run may take: a VM's boot takes minutes where guest code
/// is emulated, and the density suite boots --density VMs at once.
fn run_limit(args: &BenchArgs, instances: u32) -> Duration {
    args.run_timeout.unwrap_or_else(|| {
        Duration::from_secs(600) + Duration::from_secs(120) * instances + args.duration * 10
    })
}

/// Why a run failed, from its status and the last line it wrote.
fn failure(run: &Run) -> String {
    if let Some(limit) = run.timed_out {
        return format!("did not finish within {} s", limit.as_secs());
    }
    let text = String::from_utf8_lossy(&run.stderr);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let last: String = last.chars().take(200).collect();
    format!("exited with status {}: {last}", run.status)
}

#[allow(clippy::too_many_arguments)]
fn progress(
    suite: Suite,
    kind: Kind,
    round: u32,
    warmup: u32,
    runs: u32,
    done: usize,
    total: usize,
    left: Option<f64>,
) {
    let what = if round < warmup {
        "warm-up".to_string()
    } else {
        format!("run {}/{runs}", round - warmup + 1)
    };
    let eta = left.map_or_else(String::new, |s| format!(", ~{s:.0} s left in this suite"));
    eprintln!(
        "ligera: bench: {}: {} {what} ({done}/{total}{eta})",
        suite.name(),
        kind.name()
    );
}

/// The image's root file system as a host directory, and its name for
/// the report: a directory is used as it is; anything else is prepared as
/// the VM's disk and that disk mounted read-only (loop) in our own mount
/// namespace.
fn image_root(
    image: Option<&str>,
    scratch: &Path,
    root: bool,
) -> Result<(PathBuf, String), BenchError> {
    let Some(reference) = image else {
        let dir = crate::image::default_image()?;
        // runc takes no symlink as the root (the default image is one).
        let dir = dir
            .canonicalize()
            .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.display())))?;
        return Ok((dir, "default (busybox)".into()));
    };
    let path = Path::new(reference);
    if path.is_dir() && !crate::image::oci::is_layout(path) {
        let dir = path
            .canonicalize()
            .map_err(|e| BenchError::Setup(format!("{reference}: {e}")))?;
        return Ok((dir, reference.into()));
    }
    if !root {
        return Err(BenchError::Setup(format!(
            "{reference}: mounting an image for the container and the process needs root \
             (or give a root file system directory)"
        )));
    }
    let (disk, _) = crate::image::image_disk(reference)?;
    let mnt = scratch.join("rootfs");
    std::fs::create_dir_all(&mnt)
        .map_err(|e| BenchError::Setup(format!("cannot create {}: {e}", mnt.display())))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "ext4", "-o", "ro,loop,noload"])
        .arg(&disk)
        .arg(&mnt)
        .status()
        .map_err(|e| BenchError::Setup(format!("cannot run mount: {e}")))?;
    if !status.success() {
        return Err(BenchError::Setup(format!(
            "cannot mount the image's disk {} ({status})",
            disk.display()
        )));
    }
    Ok((mnt, reference.into()))
}

/// The process's root and the scratch disk for the disk suite: a directory
/// on the host file system the VMs' disks are on (the runtime directory),
/// bound on `/mnt` of a second view of the image (in our own mount
/// namespace, so the image itself is untouched). No disk if the image has
/// no `/mnt`.
fn disk_mounts(rootfs: &Path, scratch: &Path) -> Result<(PathBuf, Option<PathBuf>), BenchError> {
    if !rootfs.join("mnt").is_dir() {
        return Ok((rootfs.to_path_buf(), None));
    }
    let disk = scratch.join("disk");
    let view = scratch.join("process-root");
    for dir in [&disk, &view] {
        std::fs::create_dir_all(dir)
            .map_err(|e| BenchError::Setup(format!("cannot create {}: {e}", dir.display())))?;
    }
    bind(rootfs, &view)?;
    bind(&disk, &view.join("mnt"))?;
    Ok((view, Some(disk)))
}

/// `mount --bind from to`.
fn bind(from: &Path, to: &Path) -> Result<(), BenchError> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| BenchError::Setup(format!("{}: a NUL byte in the path", p.display())))
    };
    let (src, dst) = (c(from)?, c(to)?);
    // SAFETY: mount(2) with valid NUL-terminated paths.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(BenchError::Setup(format!(
            "cannot bind {} on {}: {}",
            from.display(),
            to.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Whether `path` is on a tmpfs (where the runtime directory, and so the
/// disk suite's files and the VMs' disks, are on most hosts).
fn on_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct we own, given a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == TMPFS_MAGIC
}

/// The bench image `resources/build-bench-image.sh` keeps in the cache.
fn bench_image() -> Option<PathBuf> {
    let dir = crate::image::cache_dir().ok()?.join("bench-image");
    dir.join("usr/bin/sysbench")
        .exists()
        .then(|| dir.canonicalize().ok())
        .flatten()
}

/// A mount namespace of our own, with nothing propagating back.
fn private_mounts() -> Result<(), BenchError> {
    // SAFETY: unshare and mount with valid arguments; single-threaded.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if !ok {
        return Err(BenchError::Setup(format!(
            "cannot make a private mount namespace: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Removes the scratch directory (and the bench base once empty).
struct Cleanup {
    scratch: PathBuf,
    base: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_scratch(&self.scratch);
        let _ = std::fs::remove_dir(&self.base);
    }
}

/// Stops what may still run from the scratch directory, then removes it.
fn remove_scratch(scratch: &Path) {
    let state = scratch.join("runc-state");
    if let Ok(containers) = std::fs::read_dir(&state) {
        for c in containers.flatten() {
            runtime::runc_delete(&state, &c.file_name().to_string_lossy());
        }
    }
    runtime::remove_cgroups(&runtime::container_prefix(std::process::id()));
    runtime::remove_sandboxes(&runtime::container_prefix(std::process::id()));
    net::remove(std::process::id());
    for mnt in ["process-root/mnt", "process-root", "rootfs"] {
        let mnt = scratch.join(mnt);
        if let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid path; failing (not mounted) is fine.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = std::fs::remove_dir_all(scratch);
}

mod signals {
    use std::path::PathBuf;
    use std::sync::atomic::Ordering;

    /// On SIGINT, SIGTERM or SIGHUP: stop the run in flight, clean up, and
    /// exit with 128 + the signal.
    pub fn watch(scratch: PathBuf) {
        // SAFETY: sigset operations on a local set; pthread_sigmask on
        // the calling thread (every thread started later inherits it).
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait on a valid set, writing to `sig`.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            eprintln!("ligera: bench: interrupted, cleaning up");
            let groups = {
                let _no_spawn = super::runtime::SPAWN
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                super::runtime::STOPPING.store(true, Ordering::SeqCst);
                super::runtime::GROUPS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            };
            super::runtime::stop_groups(&groups);
            super::remove_scratch(&scratch);
            if let Some(base) = scratch.parent() {
                let _ = std::fs::remove_dir(base);
            }
            std::process::exit(128 + sig);
        });
    }
}

fn host_info(nested: bool) -> Host {
    // SAFETY: utsname is plain data that uname fills.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we own.
    let kernel = if unsafe { libc::uname(&mut uts) } == 0 {
        // SAFETY: uname NUL-terminates its fields.
        unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    } else {
        "unknown".into()
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Host {
        kernel,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        nested_emulation: nested,
    }
}

/// The terminal table.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ligera bench: image {}, {} run(s) after {} warm-up, {} vCPU / {} MiB; host {} CPUs, Linux {}",
        r.settings.image,
        r.settings.runs,
        r.settings.warmup,
        r.settings.cpus,
        r.settings.memory_mib,
        r.host.cpus,
        r.host.kernel
    );
    if let Some(w) = &r.warning {
        let _ = writeln!(s, "WARNING: {w}");
    }
    let _ = writeln!(
        s,
        "{:<9} {:<10} {:<9} {:<8} {:>12} {:>25} {:>10}",
        "suite", "case", "unit", "runtime", "median", "min - max", "ratio"
    );
    for c in &r.results {
        for f in &c.runtimes {
            let head = format!(
                "{:<9} {:<10} {:<9} {:<8}",
                c.suite, c.case, c.unit, f.runtime
            );
            match (&f.skipped, f.median, f.min, f.max) {
                (Some(why), ..) => {
                    let _ = writeln!(s, "{head} skipped: {why}");
                }
                (None, Some(m), Some(lo), Some(hi)) => {
                    let ratio = f
                        .ratio_to_process
                        .map_or_else(|| "-".to_string(), |x| format!("{}x", num(x)));
                    let _ = writeln!(
                        s,
                        "{head} {:>12} {:>25} {:>10}",
                        num(m),
                        format!("{} - {}", num(lo), num(hi)),
                        ratio
                    );
                }
                _ => {
                    let _ = writeln!(s, "{head} no figure");
                }
            }
        }
    }
    let _ = writeln!(
        s,
        "(ratio: median / the bare process's median; lower is better for ms and MiB, higher for the rest)"
    );
    s
}

/// A figure for the table: whole numbers from 100 up, else three
/// significant digits (so a small figure never reads as 0.00).
fn num(v: f64) -> String {
    if v.abs() >= 100.0 || v == 0.0 || !v.is_finite() {
        format!("{v:.0}")
    } else {
        let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
        format!("{v:.digits$}")
    }
}

#[derive(Serialize)]
struct CsvRow<'a> {
    suite: &'a str,
    case: &'a str,
    unit: &'a str,
    runtime: &'a str,
    median: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    ratio_to_process: Option<f64>,
    runs: usize,
    skipped: Option<&'a str>,
}

fn csv(r: &Report) -> Result<Vec<u8>, BenchError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for c in &r.results {
        for f in &c.runtimes {
            w.serialize(CsvRow {
                suite: c.suite,
                case: c.case,
                unit: c.unit,
                runtime: f.runtime,
                median: f.median,
                min: f.min,
                max: f.max,
                ratio_to_process: f.ratio_to_process,
                runs: f.runs.len(),
                skipped: f.skipped.as_deref(),
            })
            .map_err(|e| BenchError::Setup(format!("cannot write CSV: {e}")))?;
        }
    }
    w.into_inner()
        .map_err(|e| BenchError::Setup(format!("cannot write CSV: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_sysbench_output() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let out = b"CPU speed:\n    events per second:  1234.56\n\nGeneral statistics:\n";
        assert_eq!(sysbench_figure(out, "events per second:"), Ok(1234.56));
        assert!(sysbench_figure(b"garbage", "events per second:").is_err());
        let out =
            b"Total operations: 5 (2.0 per second)\n\n555.73 MiB transferred (285.21 MiB/sec)\n";
        assert_eq!(sysbench_rate(out), Ok(285.21));
        assert!(sysbench_rate(b"nothing").is_err());
    }

    #[test]
    fn table_numbers() {
        assert_eq!(num(1741.4), "1741");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.5), "1.50");
        assert_eq!(num(0.0031), "0.00310");
        assert_eq!(num(0.0), "0");
    }

    #[test]
    fn fio_json() {
        let out = br#"note: a line before
{"jobs": [{"jobname": "randread", "read": {"iops": 12.5, "bw_bytes": 51200},
           "write": {"iops": 0.0, "bw_bytes": 0}}]}"#;
        assert_eq!(fio_figure(out, "randread", "read", "iops"), Ok(12.5));
        assert_eq!(fio_figure(out, "randread", "read", "bw_bytes"), Ok(51200.0));
        assert!(fio_figure(out, "seqread", "read", "iops").is_err());
        assert!(fio_figure(b"fio: error", "randread", "read", "iops").is_err());
    }
}

//! What confinement costs a device: the virtio-blk device model serving 4 KiB
//! random reads (and 1 MiB sequential reads) through a queue in guest
//! memory, three ways: on a thread without a filter, on a thread under the
//! block role's seccomp filter, and (as root) in a jailed process under the
//! same filter (namespaces, the jail's root with the image bind-mounted,
//! the jail's uid, its cgroup: what `ligera run` does). Batch by batch
//! interleaved, the order rotating, best of several rounds. Start-up cost
//! is measured by `resources/bench/boot-bench.py --confinement`.
//!
//!     cargo bench -p vmm --bench confinement

#[path = "../../devices/benches/common/block_device.rs"]
mod block_device;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use block_device::{BATCH, Device, T_IN, offsets};
use vmm::seccomp::Role;

const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(600);

/// Serves batches somewhere else and says how long the device was busy.
trait Worker {
    fn serve(&mut self, offsets: Vec<u64>) -> Duration;
}

/// A device on a thread, under the block role's filter or not.
struct FilteredThread {
    batches: mpsc::SyncSender<Option<Vec<u64>>>,
    busy: mpsc::Receiver<Duration>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FilteredThread {
    fn start(image: PathBuf, size: u64, filter: bool) -> FilteredThread {
        let (batches, rx) = mpsc::sync_channel::<Option<Vec<u64>>>(0);
        let (tx, busy) = mpsc::sync_channel::<Duration>(0);
        let thread = std::thread::spawn(move || {
            let mut dev = Device::new(&image, size);
            dev.describe(T_IN);
            if filter {
                vmm::seccomp::install(Role::Block).expect("the block filter");
            }
            while let Ok(Some(offs)) = rx.recv() {
                dev.busy = Duration::ZERO;
                dev.batch(T_IN, &offs);
                tx.send(dev.busy).unwrap();
            }
        });
        FilteredThread {
            batches,
            busy,
            thread: Some(thread),
        }
    }
}

impl Worker for FilteredThread {
    fn serve(&mut self, offsets: Vec<u64>) -> Duration {
        self.batches.send(Some(offsets)).unwrap();
        self.busy.recv().unwrap()
    }
}

impl Drop for FilteredThread {
    fn drop(&mut self) {
        let _ = self.batches.send(None);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A device in a jailed process (as `ligera run` jails a VM), under the
/// block role's filter, fed through a Unix socket in a directory the jail
/// holds.
struct JailedProcess {
    stream: UnixStream,
    supervisor: libc::pid_t,
    dir: PathBuf,
}

impl JailedProcess {
    /// None when the jail cannot be made (not root).
    fn start(image: &Path, size: u64) -> Option<JailedProcess> {
        let mut config = vmm::config::VmConfig::new(std::env::current_exe().unwrap());
        config.disks.push(vmm::config::DiskConfig {
            path: image.to_path_buf(),
            readonly: false,
            id: None,
        });
        let dir = std::env::temp_dir().join(format!("ligera-bench-jail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        config.api_socket = Some(dir.join("unused.sock"));
        let spec = vmm::jail::JailOptions::default().spec(&config).unwrap()?;
        let control = dir.join("control.sock");
        let _ = std::fs::remove_file(&control);
        let listener = UnixListener::bind(&control).unwrap();
        // The jailed worker connects as the jail's uid.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o777)).unwrap();
        // SAFETY: the bench has one thread here; the child becomes the
        // jail's supervisor (and its child the worker) and never returns.
        let supervisor = unsafe { libc::fork() };
        assert!(supervisor >= 0, "fork failed");
        if supervisor == 0 {
            let code = match vmm::jail::enter(&spec, &mut config, |_| ()) {
                Ok(vmm::jail::Entered::Supervisor { code, .. }) => code,
                Ok(vmm::jail::Entered::Jailed(jailed, ())) => {
                    jailed_worker(jailed, &config, &control, size);
                    0
                }
                Err(e) => {
                    eprintln!("jail: {e}");
                    1
                }
            };
            // SAFETY: leaving the forked child without running the
            // parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let (stream, _) = listener.accept().unwrap();
        Some(JailedProcess {
            stream,
            supervisor,
            dir,
        })
    }
}

/// The jailed side: the device on the (bind-mounted) image, the jail
/// locked, the block filter on, then batches until the socket closes.
fn jailed_worker(
    jailed: vmm::jail::Jailed,
    config: &vmm::config::VmConfig,
    control: &Path,
    size: u64,
) {
    let mut dev = Device::new(&config.disks[0].path, size);
    dev.describe(T_IN);
    // As a File: read(2) and write(2), which the block role allows
    // (a socket's own read would be recvfrom).
    let mut stream = std::fs::File::from(std::os::fd::OwnedFd::from(
        UnixStream::connect(control).unwrap(),
    ));
    jailed.lock_down().expect("locking the jail");
    vmm::seccomp::install(Role::Block).expect("the block filter");
    let mut count = [0u8; 8];
    while stream.read_exact(&mut count).is_ok() {
        let mut raw = vec![0u8; u64::from_le_bytes(count) as usize * 8];
        stream.read_exact(&mut raw).unwrap();
        let offs: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        dev.busy = Duration::ZERO;
        dev.batch(T_IN, &offs);
        stream
            .write_all(&(dev.busy.as_nanos() as u64).to_le_bytes())
            .unwrap();
    }
}

impl Worker for JailedProcess {
    fn serve(&mut self, offsets: Vec<u64>) -> Duration {
        let mut msg = (offsets.len() as u64).to_le_bytes().to_vec();
        for o in offsets {
            msg.extend_from_slice(&o.to_le_bytes());
        }
        self.stream.write_all(&msg).unwrap();
        let mut busy = [0u8; 8];
        self.stream.read_exact(&mut busy).unwrap();
        Duration::from_nanos(u64::from_le_bytes(busy))
    }
}

impl Drop for JailedProcess {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let mut status = 0;
        // SAFETY: waiting for the supervisor we forked.
        unsafe { libc::waitpid(self.supervisor, &mut status, 0) };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Interleaves batches between the workers (the first is the reference),
/// who goes first rotating so none always finds the caches as another left
/// them; prints the best rate of each over the rounds and its ratio to the
/// first's.
fn run(name: &str, workers: &mut [(&str, &mut dyn Worker)], random: bool, size: u64) {
    let n = workers.len();
    let mut best = vec![0f64; n];
    let mut seeds: Vec<u64> = (0..n as u64)
        .map(|i| 0x2545_f491_4f6c_dd1d_u64 ^ (i * 0x9e37_79b9_7f4a_7c15))
        .collect();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut busy = vec![Duration::ZERO; n];
        let mut reqs = 0;
        let mut turn = 0;
        while start.elapsed() < ROUND_TIME {
            for k in 0..n {
                let who = (turn + k) % n;
                let offs = offsets(random, size, reqs, usize::from(BATCH), &mut seeds[who]);
                busy[who] += workers[who].1.serve(offs);
            }
            turn += 1;
            reqs += usize::from(BATCH);
        }
        for (b, t) in best.iter_mut().zip(&busy) {
            *b = b.max(reqs as f64 / t.as_secs_f64());
        }
    }
    print!("{name:<24} {} {:>9.0} req/s", workers[0].0, best[0]);
    for (i, (wname, _)) in workers.iter().enumerate().skip(1) {
        let ratio = best[i] / best[0];
        print!(
            " | {wname} {:>9.0} req/s, ratio {ratio:.3} ({:+.1}%, target <= 3%: {})",
            best[i],
            (1.0 - ratio) * 100.0,
            if ratio >= 0.97 { "met" } else { "NOT met" }
        );
    }
    println!();
}

fn main() {
    // The SIGSYS handler, so a missing entry would name itself.
    vmm::seccomp::enable().unwrap();
    let path = block_device::tmpfs_image("confinement-bench");
    let filtered = block_device::tmpfs_image("confinement-bench-filtered");
    let jailed = block_device::tmpfs_image("confinement-bench-jailed");
    println!(
        "virtio-blk device model unconfined, under the block role's seccomp filter, and jailed \
         with the filter; {BATCH} requests per batch, interleaved, best of {ROUNDS} rounds"
    );
    for (name, random, size) in [
        ("4 KiB random reads", true, 4096),
        ("1 MiB sequential reads", false, 1 << 20),
    ] {
        // The jailed worker is forked while this process has one thread.
        let mut jail = JailedProcess::start(&jailed, size);
        let mut open = FilteredThread::start(path.clone(), size, false);
        let mut thread = FilteredThread::start(filtered.clone(), size, true);
        let mut workers: Vec<(&str, &mut dyn Worker)> =
            vec![("unconfined", &mut open), ("seccomp", &mut thread)];
        match &mut jail {
            Some(j) => workers.push(("seccomp+jail", j)),
            None => println!("(not root: the jailed case is skipped, the jail needs root)"),
        }
        run(name, &mut workers, random, size);
    }
    for p in [&path, &filtered, &jailed] {
        let _ = std::fs::remove_file(p);
    }
}

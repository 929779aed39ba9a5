//! The jailed VM's control group: a memory ceiling for the whole ligera
//! process (guest RAM plus its own overhead) and an optional CPU quota.
//!
//! Each VM gets `ligera/<supervisor pid>` at the root of the memory and cpu
//! hierarchies: on cgroup v1 (and the v1/v2 hybrid, where the controllers
//! sit on v1 mounts) one directory per controller, on a pure cgroup v2 host
//! one directory under the unified hierarchy. The supervisor creates it and
//! sets the limits before the VM process exists; the VM process joins it
//! before building the VM, so guest RAM is charged to it; the supervisor
//! removes it when the VM process is gone. One left by a killed supervisor
//! is removed by the next jailed ligera ([`remove_stale`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The group under each hierarchy's root that holds one cgroup per VM.
const PARENT: &str = "ligera";
/// CFS period for `--cpu-quota`, as Docker uses it.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Where the memory and cpu controllers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v1 (also the v1/v2 hybrid): a mount per controller.
    V1 { memory: PathBuf, cpu: PathBuf },
    /// cgroup v2 with both controllers available at its root.
    V2 { root: PathBuf },
}

impl Layout {
    /// The controllers' mounts, from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Layout, String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        Self::from_mountinfo(&info, |root| {
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default()
        })
    }

    fn from_mountinfo(info: &str, controllers: impl Fn(&Path) -> String) -> Result<Layout, String> {
        let (mut memory, mut cpu, mut unified) = (None, None, None);
        for line in info.lines() {
            let Some((mount, fs)) = line.split_once(" - ") else {
                continue;
            };
            let Some(point) = mount.split(' ').nth(4) else {
                continue;
            };
            let mut fs = fs.split(' ');
            let (kind, options) = (fs.next(), fs.nth(1).unwrap_or(""));
            let point = PathBuf::from(point);
            match kind {
                Some("cgroup") => {
                    let options: Vec<&str> = options.split(',').collect();
                    if options.contains(&"memory") {
                        memory = Some(point.clone());
                    }
                    if options.contains(&"cpu") {
                        cpu = Some(point);
                    }
                }
                Some("cgroup2") => unified = Some(point),
                _ => {}
            }
        }
        match (memory, cpu, unified) {
            (Some(memory), Some(cpu), _) => Ok(Layout::V1 { memory, cpu }),
            (_, _, Some(root)) => {
                let have = controllers(&root);
                let have: Vec<&str> = have.split_whitespace().collect();
                if have.contains(&"memory") && have.contains(&"cpu") {
                    Ok(Layout::V2 { root })
                } else {
                    Err(format!(
                        "the cgroup v2 hierarchy at {} does not offer the memory and cpu controllers",
                        root.display()
                    ))
                }
            }
            _ => Err("this host has no cgroup memory and cpu controllers mounted".into()),
        }
    }

    /// The directories holding the per-VM groups.
    fn parents(&self) -> Vec<PathBuf> {
        match self {
            Layout::V1 { memory, cpu } if memory == cpu => vec![memory.join(PARENT)],
            Layout::V1 { memory, cpu } => vec![memory.join(PARENT), cpu.join(PARENT)],
            Layout::V2 { root } => vec![root.join(PARENT)],
        }
    }
}

/// A VM's control group (one directory per hierarchy).
#[derive(Debug)]
pub struct Cgroup {
    layout: Layout,
    name: String,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value} to {}: {e}", path.display()))
}

impl Cgroup {
    /// Creates `ligera/NAME` with the memory ceiling and CPU quota set.
    pub fn create(
        layout: Layout,
        name: &str,
        memory_limit: u64,
        cpu_quota_us: Option<u64>,
    ) -> Result<Cgroup, String> {
        let cgroup = Cgroup {
            layout,
            name: name.to_string(),
        };
        // Removed again if setting a limit fails.
        let made = cgroup.make(memory_limit, cpu_quota_us);
        if let Err(e) = made {
            cgroup.remove();
            return Err(e);
        }
        Ok(cgroup)
    }

    fn make(&self, memory_limit: u64, cpu_quota_us: Option<u64>) -> Result<(), String> {
        // The shared parent may exist; a VM's own group must be new (one
        // left under our pid by an earlier life is empty and goes first).
        let mkdir = |p: &Path| match std::fs::create_dir(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !p.ends_with(&self.name) => {
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::remove_dir(p)
                .and_then(|()| std::fs::create_dir(p))
                .map_err(|e| format!("cannot create the cgroup {}: {e}", p.display())),
            Err(e) => Err(format!("cannot create the cgroup {}: {e}", p.display())),
        };
        match &self.layout {
            Layout::V1 { memory, cpu } => {
                let mem = memory.join(PARENT);
                mkdir(&mem)?;
                mkdir(&mem.join(&self.name))?;
                write(
                    &mem.join(&self.name).join("memory.limit_in_bytes"),
                    &memory_limit.to_string(),
                )?;
                let cpu = cpu.join(PARENT);
                mkdir(&cpu)?;
                mkdir(&cpu.join(&self.name))?;
                if let Some(quota) = cpu_quota_us {
                    let dir = cpu.join(&self.name);
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
            Layout::V2 { root } => {
                // Controllers must be handed down level by level.
                write(&root.join("cgroup.subtree_control"), "+memory +cpu")?;
                let parent = root.join(PARENT);
                mkdir(&parent)?;
                write(&parent.join("cgroup.subtree_control"), "+memory +cpu")?;
                let dir = parent.join(&self.name);
                mkdir(&dir)?;
                write(&dir.join("memory.max"), &memory_limit.to_string())?;
                // Swap would let the VM exceed its ceiling unseen.
                let _ = write(&dir.join("memory.swap.max"), "0");
                if let Some(quota) = cpu_quota_us {
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
            }
        }
        Ok(())
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.layout
            .parents()
            .into_iter()
            .map(|p| p.join(&self.name))
            .collect()
    }

    /// Moves the calling process, which must have one thread, into the
    /// group (before it allocates guest memory, so that is charged here).
    ///
    /// On cgroup v1 the thread is moved through `tasks`: moving the calling
    /// thread alone needs no lock on every thread group in the system,
    /// while a write to `cgroup.procs` waits for an RCU grace period (0.15 ms
    /// against 6 to 20 ms on the development machines). With one thread,
    /// the thread is the process.
    pub fn join(&self) -> Result<(), String> {
        let file = match self.layout {
            Layout::V1 { .. } => "tasks",
            Layout::V2 { .. } => "cgroup.procs",
        };
        for dir in self.dirs() {
            // "0" is the writer, whatever its PID namespace.
            write(&dir.join(file), "0")?;
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer has killed a process of the
    /// group for reaching its ceiling.
    pub fn oom_kills(&self) -> u64 {
        let (file, dir) = match &self.layout {
            Layout::V1 { memory, .. } => ("memory.oom_control", memory.join(PARENT)),
            Layout::V2 { root } => ("memory.events", root.join(PARENT)),
        };
        std::fs::read_to_string(dir.join(&self.name).join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Removes the group once its processes are gone (the kernel may take
    /// a moment to let an emptied group go).
    pub fn remove(&self) {
        for dir in self.dirs() {
            remove_dir_retrying(&dir);
        }
    }
}

fn remove_dir_retrying(dir: &Path) {
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    log::warn!("cannot remove the cgroup {}", dir.display());
}

/// Removes the groups of VMs whose supervisor is gone; returns whether
/// none is left.
pub fn remove_stale(layout: &Layout, alive: impl Fn(i32) -> bool) -> bool {
    let mut clean = true;
    for parent in layout.parents() {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let pid = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
            if let Some(pid) = pid
                && !alive(pid)
            {
                let procs = std::fs::read_to_string(e.path().join("cgroup.procs"));
                if procs.is_ok_and(|p| p.trim().is_empty()) {
                    log::info!("removing the stale cgroup {}", e.path().display());
                    clean &= std::fs::remove_dir(e.path()).is_ok();
                } else {
                    clean = false;
                }
            }
        }
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
29 1 0:26 / / rw,relatime - overlay overlay rw
35 29 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
38 35 0:33 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
41 35 0:36 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
    const V2: &str = "30 29 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn controllers_are_found_on_v1_hybrid_and_v2() {
        let none = |_: &Path| String::new();
        assert_eq!(
            Layout::from_mountinfo(HYBRID, none).unwrap(),
            Layout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into()
            }
        );
        let all = |_: &Path| "cpuset cpu io memory pids".to_string();
        assert_eq!(
            Layout::from_mountinfo(V2, all).unwrap(),
            Layout::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        assert!(Layout::from_mountinfo(V2, none).is_err());
        assert!(Layout::from_mountinfo("", none).is_err());
    }
}

//! Images as disks: everything that turns a root file system into the
//! read-only ext4 disk a sandbox boots from, and the agent into the small
//! disk it runs from, cached outside the working tree keyed by their
//! content.
//!
//! Cache: `$LIGERA_CACHE`, else `$XDG_CACHE_HOME/ligera`, else
//! `~/.cache/ligera` (the same directory the resources/ scripts use).
//! Entries are written under a temporary name and renamed into place, so a
//! crash never leaves a half-built disk under a final name.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub mod archive;
pub mod oci;
pub mod registry;

pub use oci::RunConfig;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {tool} (install e2fsprogs: resources/setup.sh does): {source}")]
    Tool {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} failed building {}: {stderr}", path.display())]
    ToolFailed {
        tool: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("no cache directory: set LIGERA_CACHE, XDG_CACHE_HOME or HOME")]
    NoCache,
    #[error(
        "no default image at {}: run resources/setup.sh (it builds one), or give --image",
        .0.display()
    )]
    NoDefaultImage(PathBuf),
    #[error("image {}: {why}", path.display())]
    Unsupported { path: PathBuf, why: String },
    #[error("image {}: {source}", path.display())]
    Oci {
        path: PathBuf,
        source: oci::OciError,
    },
}

type Result<T> = std::result::Result<T, ImageError>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { what, path, source }
}

/// ligera's cache directory (created if missing).
pub fn cache_dir() -> Result<PathBuf> {
    let dir = if let Some(d) = std::env::var_os("LIGERA_CACHE") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("ligera")
    } else if let Some(h) = std::env::var_os("HOME") {
        PathBuf::from(h).join(".cache/ligera")
    } else {
        return Err(ImageError::NoCache);
    };
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create the cache directory", &dir))?;
    Ok(dir)
}

/// The default image: the busybox root file system that
/// `resources/build-sandbox-rootfs.sh` (run by setup) keeps in the cache.
pub fn default_image() -> Result<PathBuf> {
    let dir = cache_dir()?.join("rootfs-busybox");
    if dir.join("bin/busybox").exists() {
        Ok(dir)
    } else {
        Err(ImageError::NoDefaultImage(dir))
    }
}

/// The read-only disk for the image `reference` and its run configuration.
/// The format is found from the content, not the name: a directory holding
/// an OCI image layout (`DIR`, or `DIR:TAG` to pick a tagged manifest), a
/// plain root file system directory, a tar file (plain, gzip or zstd)
/// holding an OCI layout, a `docker save` archive or a root file system
/// (`FILE` or `FILE:TAG`), or else a registry reference
/// (`HOST[:PORT]/NAME[:TAG|@DIGEST]`).
pub fn image_disk(reference: &str) -> Result<(PathBuf, RunConfig)> {
    let path = Path::new(reference);
    let (path, tag) = match reference.rsplit_once(':') {
        _ if path.exists() => (path, None),
        Some((p, tag)) if !p.is_empty() && Path::new(p).exists() => (Path::new(p), Some(tag)),
        _ => {
            if let Some(r) = registry::Reference::parse(reference) {
                return registry::pull(&r);
            }
            return Err(ImageError::Unsupported {
                path: path.to_path_buf(),
                why: "no such file or directory, and not a registry reference \
                      (HOST[:PORT]/NAME[:TAG|@DIGEST])"
                    .into(),
            });
        }
    };
    let oci_err = |source| ImageError::Oci {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err("cannot read image", path))?;
    if meta.is_dir() {
        if oci::is_layout(path) {
            let digest = oci::manifest_digest(path, tag).map_err(oci_err)?;
            return cached_image(&image_id(&digest), reference, |rootfs| {
                oci::unpack(path, tag, rootfs).map_err(oci_err)
            });
        }
        if let Some(tag) = tag {
            return Err(ImageError::Unsupported {
                path: path.to_path_buf(),
                why: format!("a root file system directory has no tags (:{tag})"),
            });
        }
        return Ok((rootfs_disk(path)?, RunConfig::default()));
    }
    archive_disk(path, tag, reference)
}

/// `reference` with its path made absolute (`PATH` or `PATH:TAG`), for a
/// process that runs elsewhere; registry references stay as they are.
pub fn absolute(reference: &str) -> String {
    if let Ok(p) = std::fs::canonicalize(reference) {
        return p.display().to_string();
    }
    if let Some((path, tag)) = reference.rsplit_once(':')
        && !path.is_empty()
        && let Ok(p) = std::fs::canonicalize(path)
    {
        return format!("{}:{tag}", p.display());
    }
    reference.to_string()
}

/// The cache id of an image with manifest (or configuration) digest
/// `digest`.
fn image_id(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("oci-{}", &hex[..16.min(hex.len())])
}

/// The disk `ID.ext4` and configuration `ID.json` from the cache, or built
/// by `unpack` (which fills the empty directory it is given) and cached.
fn cached_image(
    id: &str,
    reference: &str,
    unpack: impl FnOnce(&Path) -> Result<RunConfig>,
) -> Result<(PathBuf, RunConfig)> {
    let cache = cache_dir()?;
    let disk = cache.join(format!("{id}.ext4"));
    let config_path = cache.join(format!("{id}.json"));
    if disk.exists()
        && let Ok(bytes) = std::fs::read(&config_path)
        && let Ok(config) = serde_json::from_slice(&bytes)
    {
        return Ok((disk, config));
    }
    let stage = tempdir_in(&cache, "unpack")?;
    let rootfs = stage.path.join("rootfs");
    std::fs::create_dir(&rootfs).map_err(io_err("cannot unpack into", &rootfs))?;
    eprintln!("ligera: unpacking image {reference} ({id})");
    let config = unpack(&rootfs)?;
    publish(&rootfs, &disk, &config_path, &config)?;
    Ok((disk, config))
}

/// Builds the disk for the root file system `rootfs` and records its
/// configuration.
fn publish(rootfs: &Path, disk: &Path, config_path: &Path, config: &RunConfig) -> Result<()> {
    let size = tree_size(rootfs)?;
    eprintln!(
        "ligera: building its file system ({} MiB)",
        size.div_ceil(1 << 20)
    );
    build_ext4(rootfs, disk, size)?;
    let json = serde_json::to_vec(config).map_err(|e| ImageError::Io {
        what: "cannot record the image configuration",
        path: config_path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(config_path, json).map_err(io_err("cannot write", config_path))
}

/// The disk for the tar file `path`: an OCI layout, a `docker save`
/// archive, or a root file system. Cached per image, and the archive's own
/// sha256 remembers which image it held (`alias-*`), so a second run does
/// not extract it again.
fn archive_disk(path: &Path, tag: Option<&str>, reference: &str) -> Result<(PathBuf, RunConfig)> {
    let oci_err = |source| ImageError::Oci {
        path: path.to_path_buf(),
        source,
    };
    let compression = archive::sniff(path)
        .map_err(io_err("cannot read image", path))?
        .ok_or_else(|| ImageError::Unsupported {
            path: path.to_path_buf(),
            why: "neither a directory nor a tar archive (plain, gzip or zstd)".into(),
        })?;
    let mut file = std::fs::File::open(path).map_err(io_err("cannot read image", path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_err("cannot read image", path))?;
    let mut key = hex(&hasher.finalize()[..8]);
    if let Some(tag) = tag {
        key = format!("{key}-{}", hex(&Sha256::digest(tag.as_bytes())[..4]));
    }
    let cache = cache_dir()?;
    let alias = cache.join(format!("alias-{key}"));
    if let Ok(id) = std::fs::read_to_string(&alias) {
        let disk = cache.join(format!("{id}.ext4"));
        if disk.exists()
            && let Ok(bytes) = std::fs::read(cache.join(format!("{id}.json")))
            && let Ok(config) = serde_json::from_slice(&bytes)
        {
            return Ok((disk, config));
        }
    }
    let stage = tempdir_in(&cache, "archive")?;
    let content = stage.path.join("archive");
    std::fs::create_dir(&content).map_err(io_err("cannot unpack into", &content))?;
    eprintln!("ligera: extracting archive {}", path.display());
    archive::extract(path, compression, &content).map_err(oci_err)?;
    let (id, result) = if oci::is_layout(&content) {
        let id = image_id(&oci::manifest_digest(&content, tag).map_err(oci_err)?);
        let r = cached_image(&id, reference, |rootfs| {
            oci::unpack(&content, tag, rootfs).map_err(oci_err)
        });
        (id, r)
    } else if archive::is_docker_archive(&content) {
        let id = image_id(&archive::docker_image_id(&content, tag).map_err(oci_err)?);
        let r = cached_image(&id, reference, |rootfs| {
            archive::unpack_docker(&content, tag, rootfs).map_err(oci_err)
        });
        (id, r)
    } else {
        if let Some(tag) = tag {
            return Err(ImageError::Unsupported {
                path: path.to_path_buf(),
                why: format!("a root file system archive has no tags (:{tag})"),
            });
        }
        let id = format!("rootfs-{key}");
        let disk = cache.join(format!("{id}.ext4"));
        let config = RunConfig::default();
        let r = publish(&content, &disk, &disk.with_extension("json"), &config)
            .map(|()| (disk, config));
        (id, r)
    };
    let result = result?;
    std::fs::write(&alias, id).map_err(io_err("cannot write", &alias))?;
    Ok(result)
}

/// The read-only ext4 disk for the root file system in directory `rootfs`,
/// built once per content (paths, types, modes, owners, sizes, times, link
/// targets) and cached.
pub fn rootfs_disk(rootfs: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(rootfs).map_err(io_err("cannot read image", rootfs))?;
    if !meta.is_dir() {
        return Err(ImageError::Unsupported {
            path: rootfs.to_path_buf(),
            why: "only root file system directories are supported so far".into(),
        });
    }
    let mut hasher = Sha256::new();
    hash_tree(rootfs, rootfs, &mut hasher)?;
    let key = hex(&hasher.finalize()[..8]);
    let disk = cache_dir()?.join(format!("rootfs-{key}.ext4"));
    if !disk.exists() {
        let size = tree_size(rootfs)?;
        build_ext4(rootfs, &disk, size)?;
    }
    Ok(disk)
}

/// The small read-only disk the agent boots from: the agent binary as
/// `/agent` and the mount points it uses; cached per agent binary.
pub fn agent_disk(agent: &Path) -> Result<PathBuf> {
    let mut file = std::fs::File::open(agent).map_err(io_err("cannot open the agent", agent))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io_err("cannot read the agent", agent))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.update(AGENT_DIRS.join(",").as_bytes());
    let key = hex(&hasher.finalize()[..8]);
    let cache = cache_dir()?;
    let disk = cache.join(format!("agent-{key}.ext4"));
    if disk.exists() {
        return Ok(disk);
    }
    let stage = tempdir_in(&cache, "agent-stage")?;
    for dir in AGENT_DIRS {
        std::fs::create_dir_all(stage.path.join(dir))
            .map_err(io_err("cannot stage the agent disk", &stage.path))?;
    }
    let target = stage.path.join("agent");
    std::fs::copy(agent, &target).map_err(io_err("cannot stage the agent", &target))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("cannot stage the agent", &target))?;
    let size = tree_size(&stage.path)?;
    build_ext4(&stage.path, &disk, size)?;
    Ok(disk)
}

/// Mount points on the agent disk.
const AGENT_DIRS: [&str; 8] = [
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "mnt/image",
    "mnt/scratch",
    "mnt/root",
];

/// A sparse, empty ext4 file system of `size` bytes at `path`: a sandbox's
/// writable layer.
pub fn scratch_disk(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path).map_err(io_err("cannot create", path))?;
    f.set_len(size).map_err(io_err("cannot size", path))?;
    drop(f);
    mkfs(path, None)
}

/// Builds an ext4 image of `dir` at `disk` (via a temporary file).
fn build_ext4(dir: &Path, disk: &Path, content: u64) -> Result<()> {
    // Room for metadata: a quarter more plus 8 MiB, in whole MiB.
    let size = (content + content / 4 + (8 << 20)).div_ceil(1 << 20) << 20;
    let tmp = disk.with_extension(format!("tmp{}", std::process::id()));
    let f = std::fs::File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
    f.set_len(size).map_err(io_err("cannot size", &tmp))?;
    drop(f);
    if let Err(e) = mkfs(&tmp, Some(dir)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, disk).map_err(io_err("cannot publish", disk))
}

fn mkfs(path: &Path, content: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    // No journal (a throwaway or read-only disk), no lazy init work left
    // for the guest, files owned as in the source.
    cmd.args([
        "-q",
        "-F",
        "-O",
        "^has_journal",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
    ]);
    if let Some(dir) = content {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(path);
    let out = cmd.output().map_err(|source| ImageError::Tool {
        tool: "mkfs.ext4",
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::ToolFailed {
            tool: "mkfs.ext4",
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn hash_tree(root: &Path, dir: &Path, h: &mut Sha256) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_err("cannot read image", dir))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let m = std::fs::symlink_metadata(&path).map_err(io_err("cannot read image", &path))?;
        let rel = path.strip_prefix(root).unwrap_or(&path);
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(
            format!(
                "\0{}:{}:{}:{}:{}:{}\0",
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            )
            .as_bytes(),
        );
        if m.file_type().is_symlink() {
            let t = std::fs::read_link(&path).map_err(io_err("cannot read image", &path))?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if m.is_dir() {
            hash_tree(root, &path, h)?;
        }
    }
    Ok(())
}

fn tree_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).map_err(io_err("cannot read image", dir))? {
        let e = e.map_err(io_err("cannot read image", dir))?;
        let m =
            std::fs::symlink_metadata(e.path()).map_err(io_err("cannot read image", &e.path()))?;
        total += m.len().max(4096);
        if m.is_dir() {
            total += tree_size(&e.path())?;
        }
    }
    Ok(total)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A new empty directory in `parent`, removed when dropped.
pub fn tempdir_in(parent: &Path, prefix: &str) -> Result<TempDir> {
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!(
            ".{prefix}-{}-{nanos}-{attempt}",
            std::process::id()
        ));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(TempDir { path }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("cannot create a directory in", parent)(e)),
        }
    }
    Err(io_err("cannot create a directory in", parent)(
        std::io::ErrorKind::AlreadyExists.into(),
    ))
}

/// One cached image disk.
pub struct CachedImage {
    /// `oci-<digest prefix>` or `rootfs-<tree hash>`.
    pub id: String,
    pub disk: PathBuf,
    pub bytes: u64,
    /// Seconds since it was last used (its disk's access time).
    pub idle_secs: u64,
}

/// The image disks in the cache (the agent's disk is not an image).
pub fn cached_images() -> Result<Vec<CachedImage>> {
    let dir = cache_dir()?;
    let mut out = Vec::new();
    let now = std::time::SystemTime::now();
    for e in std::fs::read_dir(&dir)
        .map_err(io_err("cannot read", &dir))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".ext4") else {
            continue;
        };
        if !(id.starts_with("oci-") || id.starts_with("rootfs-")) {
            continue;
        }
        let Ok(m) = e.metadata() else { continue };
        let idle_secs = m
            .accessed()
            .ok()
            .and_then(|a| now.duration_since(a).ok())
            .map_or(0, |d| d.as_secs());
        out.push(CachedImage {
            id: id.to_string(),
            disk: e.path(),
            bytes: m.blocks() * 512,
            idle_secs,
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Removes the cached image `id` (or every one, for `None`); returns the
/// ids removed. A running sandbox keeps its open disk until it ends.
pub fn remove_cached(id: Option<&str>) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for image in cached_images()? {
        if id.is_none_or(|id| image.id == id || image.id.ends_with(id)) {
            std::fs::remove_file(&image.disk).map_err(io_err("cannot remove", &image.disk))?;
            let _ = std::fs::remove_file(image.disk.with_extension("json"));
            removed.push(image.id);
        }
    }
    // Archives remembered as holding a removed image.
    let dir = cache_dir()?;
    for e in std::fs::read_dir(&dir)
        .map_err(io_err("cannot read", &dir))?
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("alias-")
            && let Ok(target) = std::fs::read_to_string(e.path())
            && removed.contains(&target)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(removed)
}

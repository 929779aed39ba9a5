//! OCI image layouts (`index.json`, `oci-layout`, `blobs/sha256/…`, as
//! `skopeo copy … oci:DIR` writes them) unpacked into a root file system
//! directory, layer by layer.
//!
//! An image is untrusted input. Every blob's size and sha256 are checked
//! against its descriptor (layers while they stream); layers are plain,
//! gzip or zstd tar streams whose entries may not leave the root: absolute
//! paths and `..` components are refused, and each entry is written by
//! `tar`'s `unpack_in`, which refuses to write through a symlink that
//! leads outside. OCI whiteouts apply (`.wh.NAME` removes NAME from the
//! layers below, `.wh..wh..opq` empties the directory of what the layers
//! below put there). The unpacked size and entry count are bounded, so a
//! bomb is an error, not a full disk.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

/// Most bytes an image may unpack to.
pub const MAX_UNPACKED: u64 = 16 << 30;
/// Most entries across its layers.
pub const MAX_ENTRIES: u64 = 2_000_000;
/// Largest JSON blob (index, manifest, config) read.
const MAX_JSON: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0}")]
    Bad(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

type Result<T> = std::result::Result<T, OciError>;

pub(super) fn bad(msg: impl Into<String>) -> OciError {
    OciError::Bad(msg.into())
}

/// What the image's configuration asks for (as `docker run` applies it).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// Whether `dir` holds an OCI image layout.
pub fn is_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file() && dir.join("index.json").is_file()
}

/// The descriptor's digest as (algorithm, hex).
fn digest_parts(d: &Descriptor) -> Result<(String, String)> {
    let text = d.digest().to_string();
    match text.split_once(':') {
        Some((alg, hex))
            if alg == "sha256"
                && hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok((alg.to_string(), hex.to_string()))
        }
        _ => Err(bad(format!("digest {text} is not a sha256 digest"))),
    }
}

fn blob_path(layout: &Path, d: &Descriptor) -> Result<PathBuf> {
    let (alg, hex) = digest_parts(d)?;
    Ok(layout.join("blobs").join(alg).join(hex))
}

/// Reads a whole (small) blob and checks its size and digest.
fn read_blob(layout: &Path, d: &Descriptor) -> Result<Vec<u8>> {
    if d.size() > MAX_JSON {
        return Err(bad(format!(
            "blob {} is {} bytes; metadata blobs are at most {MAX_JSON}",
            d.digest(),
            d.size()
        )));
    }
    let path = blob_path(layout, d)?;
    let data = std::fs::read(&path).map_err(|source| OciError::Io {
        what: format!("cannot read blob {}", path.display()),
        source,
    })?;
    check(d, data.len() as u64, &Sha256::digest(&data))?;
    Ok(data)
}

fn check(d: &Descriptor, size: u64, digest: &[u8]) -> Result<()> {
    let (_, want) = digest_parts(d)?;
    let got: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    if size != d.size() {
        return Err(bad(format!(
            "blob {} is {size} bytes, its descriptor says {}",
            d.digest(),
            d.size()
        )));
    }
    if got != want {
        return Err(bad(format!(
            "blob {} has digest sha256:{got}: it does not match",
            d.digest()
        )));
    }
    Ok(())
}

/// A reader that hashes and counts what passes through it.
pub(super) struct Hashing<R> {
    pub(super) inner: R,
    pub(super) hasher: Sha256,
    pub(super) count: u64,
    pub(super) limit: u64,
}

impl<R> Hashing<R> {
    pub(super) fn new(inner: R, limit: u64) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
        }
    }

    /// The lowercase hex sha256 of what was read.
    pub(super) fn hex(self) -> String {
        self.hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other(
                "the blob is longer than its descriptor says",
            ));
        }
        Ok(n)
    }
}

/// The digest of the manifest `unpack` would use: the image's identity.
pub fn manifest_digest(layout: &Path, tag: Option<&str>) -> Result<String> {
    let d = choose(read_index(layout)?.manifests(), tag)?;
    digest_parts(&d)?;
    Ok(d.digest().to_string())
}

fn read_index(layout: &Path) -> Result<ImageIndex> {
    let index_path = layout.join("index.json");
    let meta = std::fs::metadata(&index_path).map_err(|source| OciError::Io {
        what: format!("cannot read {}", index_path.display()),
        source,
    })?;
    if meta.len() > MAX_JSON {
        return Err(bad("index.json is too large"));
    }
    ImageIndex::from_file(&index_path).map_err(|e| bad(format!("{}: {e}", index_path.display())))
}

/// Unpacks the image in `layout` (the manifest tagged `tag`, or the only
/// one) into the empty directory `dest`; returns its run configuration.
pub fn unpack(layout: &Path, tag: Option<&str>, dest: &Path) -> Result<RunConfig> {
    let index = read_index(layout)?;
    let manifest_desc = choose(index.manifests(), tag)?;
    let mut manifest_bytes = read_blob(layout, &manifest_desc)?;
    // An index inside the index: one more level, by platform.
    if manifest_desc.media_type().to_string().contains("index") {
        let inner: ImageIndex = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| bad(format!("image index {}: {e}", manifest_desc.digest())))?;
        let d = choose(inner.manifests(), None)?;
        manifest_bytes = read_blob(layout, &d)?;
    }
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| bad(format!("image manifest: {e}")))?;
    let config_bytes = read_blob(layout, manifest.config())?;
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
        .map_err(|e| bad(format!("image configuration: {e}")))?;

    let mut budget = Budget::image();
    for layer in manifest.layers() {
        apply_layer(layout, layer, dest, &mut budget)?;
    }
    Ok(run_config(&config))
}

/// The parts of an image configuration `docker run` applies.
pub(super) fn run_config(config: &ImageConfiguration) -> RunConfig {
    let c = config.config().clone().unwrap_or_default();
    RunConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        workdir: c.working_dir().clone().filter(|w| !w.is_empty()),
        user: c.user().clone().filter(|u| !u.is_empty()),
    }
}

/// The manifest for `tag` (its `org.opencontainers.image.ref.name`), or
/// the only one, or the linux/amd64 one.
fn choose(manifests: &[Descriptor], tag: Option<&str>) -> Result<Descriptor> {
    let name = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned())
    };
    if let Some(tag) = tag {
        return manifests
            .iter()
            .find(|d| name(d).as_deref() == Some(tag))
            .cloned()
            .ok_or_else(|| bad(format!("the image layout has no manifest tagged {tag}")));
    }
    match manifests {
        [] => Err(bad("the image layout lists no manifest")),
        [one] => Ok(one.clone()),
        many => many
            .iter()
            .find(|d| {
                d.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
                })
            })
            .cloned()
            .ok_or_else(|| {
                bad("the image layout has several manifests and none for linux/amd64: name a tag")
            }),
    }
}

/// What is left of an image's size and entry limits.
pub(super) struct Budget {
    bytes: u64,
    entries: u64,
}

impl Budget {
    pub(super) fn image() -> Self {
        Budget {
            bytes: MAX_UNPACKED,
            entries: MAX_ENTRIES,
        }
    }
}

/// Checks that an entry's path stays inside the root; returns it relative.
pub(super) fn safe_path(raw: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad(format!(
                    "layer entry {} has an absolute path",
                    raw.display()
                )));
            }
            Component::ParentDir => {
                return Err(bad(format!(
                    "layer entry {} climbs out with '..'",
                    raw.display()
                )));
            }
        }
    }
    Ok(out)
}

fn apply_layer(layout: &Path, layer: &Descriptor, dest: &Path, budget: &mut Budget) -> Result<()> {
    let path = blob_path(layout, layer)?;
    let file = File::open(&path).map_err(|source| OciError::Io {
        what: format!("cannot open layer {}", path.display()),
        source,
    })?;
    let mut hashing = Hashing::new(io::BufReader::new(file), layer.size());
    let media = layer.media_type().to_string();
    {
        let stream: Box<dyn Read + '_> = if media.ends_with("gzip") {
            Box::new(flate2::read::GzDecoder::new(&mut hashing))
        } else if media.ends_with("zstd") {
            Box::new(
                ruzstd::decoding::StreamingDecoder::new(&mut hashing)
                    .map_err(|e| bad(format!("layer {}: {e}", layer.digest())))?,
            )
        } else if media.ends_with("tar") || media.ends_with(".tar") {
            Box::new(&mut hashing)
        } else {
            return Err(bad(format!(
                "layer {} has media type {media}, not a tar (plain, gzip or zstd)",
                layer.digest()
            )));
        };
        unpack_tar(stream, dest, budget)
            .map_err(|e| bad(format!("layer {}: {e}", layer.digest())))?;
    }
    // Whatever the tar reader left unread still counts for the digest.
    io::copy(&mut hashing, &mut io::sink()).map_err(|source| OciError::Io {
        what: format!("cannot read layer {}", layer.digest()),
        source,
    })?;
    let Hashing { hasher, count, .. } = hashing;
    check(layer, count, &hasher.finalize())
}

/// Applies one layer's tar stream to `dest`.
pub(super) fn unpack_tar(stream: impl Read, dest: &Path, budget: &mut Budget) -> Result<()> {
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    // What this layer wrote: an opaque whiteout hides only the layers below.
    let mut ours: HashSet<PathBuf> = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar stream: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("broken tar stream: {e}")))?;
        budget.entries = budget
            .entries
            .checked_sub(1)
            .ok_or_else(|| bad(format!("more than {MAX_ENTRIES} entries")))?;
        let size = entry.header().size().unwrap_or(0);
        budget.bytes = budget
            .bytes
            .checked_sub(size)
            .ok_or_else(|| bad(format!("it unpacks to more than {MAX_UNPACKED} bytes")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("bad entry name: {e}")))?
            .into_owned();
        let rel = safe_path(&raw)?;
        if let Some(link) = entry
            .link_name()
            .map_err(|e| bad(format!("bad link name: {e}")))?
            && entry.header().entry_type().is_hard_link()
        {
            safe_path(&link)?;
        }
        let Some(file_name) = rel.file_name().and_then(|n| n.to_str()).map(String::from) else {
            continue; // the root itself
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if file_name == ".wh..wh..opq" {
            let dir = dest.join(&parent);
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    let child_rel = parent.join(child.file_name());
                    if !ours.contains(&child_rel) {
                        remove(&child.path());
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            remove(&dest.join(&parent).join(hidden));
            continue;
        }
        if matches!(
            entry.header().entry_type(),
            tar::EntryType::Char | tar::EntryType::Block
        ) {
            log::debug!("image: device node {} skipped", rel.display());
            continue;
        }
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|e| bad(format!("cannot unpack {}: {e}", rel.display())))?;
        if !unpacked {
            return Err(bad(format!("entry {} would leave the root", rel.display())));
        }
        ours.insert(rel);
    }
    Ok(())
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

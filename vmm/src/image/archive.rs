//! Image archives: one tar file (plain, gzip or zstd, found from its first
//! bytes) holding either an OCI image layout (`skopeo copy … oci-archive:`,
//! and `docker save` since Docker 25), a classic `docker save` archive
//! (`manifest.json`, one tar per layer, and the image configuration whose
//! `rootfs.diff_ids` give each layer's sha256), or a plain root file system.
//!
//! The archive is untrusted like any image: it is extracted with the same
//! rules as a layer (nothing outside the directory, bounded size and entry
//! count), and the paths `manifest.json` names must stay inside it, with no
//! symlink leading elsewhere.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use serde::Deserialize;

use super::oci::{Budget, Hashing, OciError, RunConfig, bad, run_config, safe_path, unpack_tar};

type Result<T> = std::result::Result<T, OciError>;

/// How a tar file is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> OciError {
    move |source| OciError::Io { what, source }
}

/// Whether `path` is a tar archive and how it is compressed; `None` when
/// its first bytes are neither a tar header nor gzip or zstd holding one.
pub fn sniff(path: &Path) -> io::Result<Option<Compression>> {
    let mut head = [0u8; 4];
    let n = File::open(path)?.read(&mut head)?;
    let compression = match &head[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    };
    let mut header = [0u8; 512];
    let mut stream = open(path, compression)?;
    let mut got = 0;
    while got < header.len() {
        match stream.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return Ok(None),
        }
    }
    // The ustar magic: "ustar\0" (POSIX) or "ustar " (GNU).
    Ok((got == 512 && &header[257..262] == b"ustar").then_some(compression))
}

/// The decompressed stream of the tar file at `path`.
pub fn open(path: &Path, compression: Compression) -> io::Result<Box<dyn Read>> {
    let file = BufReader::new(File::open(path)?);
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(file)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
        ),
    })
}

/// Extracts the whole archive into the empty directory `dest`. The archive
/// must end with tar's end marker (two zero blocks; the reader stops after
/// the first): one cut at a block boundary would otherwise pass for a
/// smaller archive.
pub fn extract(path: &Path, compression: Compression, dest: &Path) -> Result<()> {
    let mut stream =
        open(path, compression).map_err(io_err(format!("cannot read {}", path.display())))?;
    unpack_tar(&mut stream, dest, &mut Budget::image())?;
    let mut second = Vec::with_capacity(512);
    (&mut stream)
        .take(512)
        .read_to_end(&mut second)
        .map_err(io_err(format!("cannot read {}", path.display())))?;
    if second.len() < 512 || second.iter().any(|&b| b != 0) {
        return Err(bad(
            "the archive ends without tar's end marker: it is truncated",
        ));
    }
    Ok(())
}

/// One image in a `docker save` archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Whether the extracted archive `dir` is a classic `docker save` archive.
pub fn is_docker_archive(dir: &Path) -> bool {
    dir.join("manifest.json").is_file()
}

/// `rel` inside `dir`: no absolute path, no `..`, and no symlink on the way
/// that leads out of `dir`.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf> {
    let rel_path = safe_path(Path::new(rel))?;
    let path = dir.join(&rel_path);
    let real = path
        .canonicalize()
        .map_err(io_err(format!("manifest.json names {rel}")))?;
    let root = dir
        .canonicalize()
        .map_err(io_err(format!("cannot read {}", dir.display())))?;
    if !real.starts_with(&root) {
        return Err(bad(format!(
            "manifest.json names {rel}, which leads out of the archive"
        )));
    }
    Ok(real)
}

/// The image `tag` names (`NAME:TAG` or `TAG` as in its RepoTags), or the
/// only one.
fn docker_entry(dir: &Path, tag: Option<&str>) -> Result<DockerEntry> {
    let path = dir.join("manifest.json");
    let meta =
        std::fs::symlink_metadata(&path).map_err(io_err("cannot read manifest.json".into()))?;
    if !meta.is_file() || meta.len() > 4 << 20 {
        return Err(bad("manifest.json is not a regular file of at most 4 MiB"));
    }
    let bytes = std::fs::read(&path).map_err(io_err("cannot read manifest.json".into()))?;
    let mut entries: Vec<DockerEntry> =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let matches = |e: &DockerEntry, tag: &str| {
        e.repo_tags
            .iter()
            .flatten()
            .any(|t| t == tag || t.rsplit_once(':').is_some_and(|(_, only)| only == tag))
    };
    match tag {
        Some(tag) => entries
            .into_iter()
            .find(|e| matches(e, tag))
            .ok_or_else(|| bad(format!("the archive has no image tagged {tag}"))),
        None if entries.len() == 1 => Ok(entries.remove(0)),
        None if entries.is_empty() => Err(bad("manifest.json lists no image")),
        None => Err(bad(
            "the archive holds several images: name one (ARCHIVE:TAG)",
        )),
    }
}

/// Reads the image configuration; returns it with its sha256 (the image
/// id), checked against its file name when that is a digest.
fn docker_config(dir: &Path, entry: &DockerEntry) -> Result<(ImageConfiguration, String)> {
    let path = inside(dir, &entry.config)?;
    let file = File::open(&path).map_err(io_err(format!("cannot open {}", entry.config)))?;
    let mut hashing = Hashing::new(file.take(4 << 20), u64::MAX);
    let mut bytes = Vec::new();
    hashing
        .read_to_end(&mut bytes)
        .map_err(io_err(format!("cannot read {}", entry.config)))?;
    let digest = hashing.hex();
    let named = Path::new(&entry.config)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".json"))
        .unwrap_or_default();
    if named.len() == 64 && named.bytes().all(|b| b.is_ascii_hexdigit()) && named != digest {
        return Err(bad(format!(
            "{} has digest sha256:{digest}: it does not match its name",
            entry.config
        )));
    }
    let config: ImageConfiguration = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("image configuration {}: {e}", entry.config)))?;
    Ok((config, digest))
}

/// The image id (`sha256:` of its configuration) of the image `tag` in the
/// extracted `docker save` archive `dir`.
pub fn docker_image_id(dir: &Path, tag: Option<&str>) -> Result<String> {
    let entry = docker_entry(dir, tag)?;
    Ok(format!("sha256:{}", docker_config(dir, &entry)?.1))
}

/// Unpacks the image `tag` of the extracted `docker save` archive `dir`
/// into the empty directory `dest`: each layer (plain, gzip or zstd) must
/// decompress to the sha256 its `rootfs.diff_ids` entry names.
pub fn unpack_docker(dir: &Path, tag: Option<&str>, dest: &Path) -> Result<RunConfig> {
    let entry = docker_entry(dir, tag)?;
    let (config, _) = docker_config(dir, &entry)?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != entry.layers.len() {
        return Err(bad(format!(
            "manifest.json lists {} layers, the configuration {}",
            entry.layers.len(),
            diff_ids.len()
        )));
    }
    let mut budget = Budget::image();
    for (layer, diff_id) in entry.layers.iter().zip(diff_ids) {
        let path = inside(dir, layer)?;
        let compression = sniff(&path)
            .map_err(io_err(format!("cannot read layer {layer}")))?
            .ok_or_else(|| bad(format!("layer {layer} is not a tar (plain, gzip or zstd)")))?;
        let stream =
            open(&path, compression).map_err(io_err(format!("cannot read layer {layer}")))?;
        let mut hashing = Hashing::new(stream, u64::MAX);
        unpack_tar(&mut hashing, dest, &mut budget)
            .map_err(|e| bad(format!("layer {layer}: {e}")))?;
        io::copy(&mut hashing, &mut io::sink())
            .map_err(io_err(format!("cannot read layer {layer}")))?;
        let got = format!("sha256:{}", hashing.hex());
        if &got != diff_id {
            return Err(bad(format!(
                "layer {layer} has digest {got}; the configuration says {diff_id}"
            )));
        }
    }
    Ok(run_config(&config))
}

//! Writes OCI image layouts for the tests, from entries they describe
//! (hostile ones too: the tar headers are written by hand where the `tar`
//! crate would refuse a name).

use std::path::Path;

use sha2::{Digest, Sha256};

/// One entry of a layer.
pub enum Entry {
    Dir(&'static str, u32),
    File(&'static str, Vec<u8>, u32),
    /// A file with owner uid/gid.
    Owned(&'static str, Vec<u8>, u32, u64, u64),
    Symlink(&'static str, &'static str),
    HardLink(&'static str, &'static str),
    /// A file whose name is written as is, unchecked.
    RawName(&'static str, Vec<u8>),
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// A layer's uncompressed tar.
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p, mode) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::Owned(p, data, mode, uid, gid) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                h.set_uid(*uid);
                h.set_gid(*gid);
                b.append_data(&mut h, p, &data[..]).unwrap();
            }
            Entry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::HardLink(p, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::RawName(name, data) => {
                let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
                let raw = &mut h.as_old_mut().name;
                raw.fill(0);
                raw[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                b.append(&h, &data[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stores `data` as a blob; returns its descriptor JSON.
fn blob(dir: &Path, media: &str, data: &[u8]) -> serde_json::Value {
    let digest = hex(&Sha256::digest(data));
    let path = dir.join("blobs/sha256").join(&digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    serde_json::json!({"mediaType": media, "digest": format!("sha256:{digest}"), "size": data.len()})
}

/// An image configuration (linux/amd64) with `config` and the layers'
/// uncompressed digests.
fn image_config(config: serde_json::Value, diff_ids: Vec<String>) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
}

/// A layer as stored: its bytes and media type.
pub struct Layer {
    pub bytes: Vec<u8>,
    pub media: &'static str,
}

impl Layer {
    pub fn plain(entries: &[Entry]) -> Layer {
        Layer {
            bytes: tar(entries),
            media: "application/vnd.oci.image.layer.v1.tar",
        }
    }

    pub fn gzip(entries: &[Entry]) -> Layer {
        Layer {
            bytes: gzip(&tar(entries)),
            media: "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }
}

/// Writes an OCI image layout with `layers` and the image configuration
/// `config` (the `config` object of the image config), tagged `tag`.
pub fn write_layout(dir: &Path, layers: &[Layer], config: serde_json::Value, tag: &str) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion": "1.0.0"}"#).unwrap();
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| blob(dir, l.media, &l.bytes))
        .collect();
    let diff_ids: Vec<_> = layers
        .iter()
        .map(|l| {
            let tar_bytes = if l.media.ends_with("gzip") {
                let mut out = Vec::new();
                use std::io::Read;
                flate2::read::GzDecoder::new(&l.bytes[..])
                    .read_to_end(&mut out)
                    .unwrap_or(0);
                out
            } else {
                l.bytes.clone()
            };
            format!("sha256:{}", hex(&Sha256::digest(&tar_bytes)))
        })
        .collect();
    let image_config = image_config(config, diff_ids);
    let config_desc = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        image_config.to_string().as_bytes(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    });
    let mut manifest_desc = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    manifest_desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

/// Writes a classic `docker save` archive (tar) at `path`: `manifest.json`,
/// the configuration named by its sha256, one `ID/layer.tar` per layer.
/// `layers` are uncompressed tars; `mangle` may edit manifest.json's entry
/// before it is written (hostile archives).
pub fn write_docker_archive(
    path: &Path,
    layers: &[Vec<u8>],
    config: serde_json::Value,
    tag: &str,
    mangle: impl FnOnce(&mut serde_json::Value, &mut tar::Builder<Vec<u8>>),
) {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", hex(&Sha256::digest(l))))
        .collect();
    let image_config = image_config(config, diff_ids).to_string();
    let config_name = format!("{}.json", hex(&Sha256::digest(image_config.as_bytes())));
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    add(&mut b, &config_name, image_config.as_bytes());
    let mut layer_names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("{i:064x}/layer.tar");
        add(&mut b, &name, l);
        layer_names.push(name);
    }
    let mut entry = serde_json::json!({
        "Config": config_name,
        "RepoTags": [format!("test/image:{tag}")],
        "Layers": layer_names,
    });
    mangle(&mut entry, &mut b);
    add(
        &mut b,
        "manifest.json",
        serde_json::json!([entry]).to_string().as_bytes(),
    );
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

/// A tar of the directory `dir` (an OCI archive when `dir` is a layout).
pub fn tar_dir(dir: &Path, path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

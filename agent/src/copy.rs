//! File copies as tar streams (`ligera sandbox cp`), the same code on both
//! ends: the agent packs and unpacks inside the guest's root, ligera
//! unpacks what comes out of a guest on the host.
//!
//! Semantics as `docker cp`: the stream's entries all sit under one top
//! name (the source's base name). Unpacked at `dest`: when `dest` is an
//! existing directory the top name is kept inside it; otherwise `dest` is
//! created with the source's content (the copy is renamed).
//!
//! What is unpacked is untrusted (on the host it comes from the guest): no
//! entry may be absolute or climb with `..`, none may be written through a
//! symlink leading out (the `tar` crate's `unpack_in`), hard links must
//! point inside, device nodes and FIFOs are skipped, owners are not
//! applied, and the total size and entry count are bounded.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// Bounds on what [`unpack`] accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub bytes: u64,
    pub entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            bytes: 16 << 30,
            entries: 1_000_000,
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Writes `path` (file, directory tree or symlink, not followed) as a tar
/// stream whose entries sit under `path`'s base name.
pub fn pack(path: &Path, out: impl Write) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let name = path
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("root"));
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    if meta.is_dir() {
        b.append_dir_all(&name, path)?;
    } else {
        b.append_path_with_name(path, &name)?;
    }
    b.into_inner()?.flush()
}

/// `raw` as a relative path that stays inside.
fn relative(raw: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "entry {} is absolute or climbs out with '..'",
                    raw.display()
                )));
            }
        }
    }
    Ok(out)
}

/// Unpacks a [`pack`] stream at `dest` (see the module's semantics).
pub fn unpack(input: impl Read, dest: &Path, limits: Limits) -> io::Result<()> {
    let into_dir = std::fs::metadata(dest).is_ok_and(|m| m.is_dir());
    let base = if into_dir {
        dest.to_path_buf()
    } else {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !std::fs::metadata(&parent).is_ok_and(|m| m.is_dir()) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no such directory", parent.display()),
            ));
        }
        parent
    };
    // Unpacked in a fresh directory next to the destination, then moved
    // into place: a rename never follows what is at `dest`.
    let stage = base.join(format!(".ligera-cp-{}", std::process::id()));
    std::fs::create_dir(&stage)?;
    let result = unpack_in(input, &stage, limits).and_then(|top| {
        let Some(top) = top else {
            return Err(invalid("the copy holds no entry".into()));
        };
        let target = if into_dir {
            dest.join(&top)
        } else {
            dest.to_path_buf()
        };
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            // Merging into an existing directory: move entry by entry.
            merge(&stage.join(&top), &target)
        } else {
            std::fs::rename(stage.join(&top), &target)
        }
    });
    let _ = std::fs::remove_dir_all(&stage);
    result
}

/// Moves the children of `from` into the existing directory `to`.
fn merge(from: &Path, to: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        let is_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
        if is_dir(&e.path()) && is_dir(&target) {
            merge(&e.path(), &target)?;
        } else {
            if is_dir(&target) {
                std::fs::remove_dir_all(&target)?;
            }
            std::fs::rename(e.path(), &target)?;
        }
    }
    Ok(())
}

/// Unpacks every entry inside `dir`; returns the stream's top name.
fn unpack_in(input: impl Read, dir: &Path, limits: Limits) -> io::Result<Option<PathBuf>> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(false);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let (mut bytes, mut entries) = (limits.bytes, limits.entries);
    let mut top: Option<PathBuf> = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        entries = entries
            .checked_sub(1)
            .ok_or_else(|| invalid(format!("more than {} entries", limits.entries)))?;
        bytes = bytes
            .checked_sub(entry.header().size().unwrap_or(0))
            .ok_or_else(|| invalid(format!("more than {} bytes", limits.bytes)))?;
        let rel = relative(&entry.path()?)?;
        let Some(first) = rel.components().next() else {
            continue;
        };
        let first = PathBuf::from(first.as_os_str());
        match &top {
            None => top = Some(first),
            Some(t) if *t == first => {}
            Some(t) => {
                return Err(invalid(format!(
                    "entry {} is not under {}",
                    rel.display(),
                    t.display()
                )));
            }
        }
        let kind = entry.header().entry_type();
        if kind.is_hard_link()
            && let Some(link) = entry.link_name()?
        {
            relative(&link)?;
        }
        if matches!(
            kind,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo
        ) {
            continue;
        }
        if !entry.unpack_in(dir)? {
            return Err(invalid(format!("entry {} would leave", rel.display())));
        }
    }
    Ok(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-copy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn trees_and_files_copy_as_docker_cp_does() {
        let d = scratch("trees");
        let src = d.join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/f"), b"data").unwrap();
        std::os::unix::fs::symlink("sub/f", src.join("link")).unwrap();
        let mut tar = Vec::new();
        pack(&src, &mut tar).unwrap();
        // Into an existing directory: kept under its name.
        let into = d.join("into");
        std::fs::create_dir(&into).unwrap();
        unpack(&tar[..], &into, Limits::default()).unwrap();
        assert_eq!(std::fs::read(into.join("src/sub/f")).unwrap(), b"data");
        assert_eq!(
            std::fs::read_link(into.join("src/link")).unwrap(),
            Path::new("sub/f")
        );
        // To a new name: renamed.
        unpack(&tar[..], &d.join("renamed"), Limits::default()).unwrap();
        assert_eq!(std::fs::read(d.join("renamed/sub/f")).unwrap(), b"data");
        // A file to a new name, and over an existing file.
        let mut one = Vec::new();
        pack(&src.join("sub/f"), &mut one).unwrap();
        unpack(&one[..], &d.join("copy"), Limits::default()).unwrap();
        unpack(&one[..], &d.join("copy"), Limits::default()).unwrap();
        assert_eq!(std::fs::read(d.join("copy")).unwrap(), b"data");
        // No stage left; a missing parent is an error.
        assert!(unpack(&one[..], &d.join("no/such/x"), Limits::default()).is_err());
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".ligera"))
            .collect();
        assert!(left.is_empty());
        // Too big.
        let small = Limits {
            bytes: 2,
            entries: 100,
        };
        assert!(unpack(&tar[..], &d.join("small"), small).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    /// A tar whose entries are written as given, unchecked.
    fn raw_tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(if *kind == tar::EntryType::Regular {
                1
            } else {
                0
            });
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if !link.is_empty() {
                h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"x"
            } else {
                b""
            };
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn nothing_lands_outside_the_destination() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let d = std::env::temp_dir().join(format!("agent-copy-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let outside = d.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let out = outside.to_str().unwrap();
        let cases: Vec<Vec<(&str, tar::EntryType, &str)>> = vec![
            vec![("top/../../outside/pwned", Regular, "")],
            vec![("../outside/pwned", Regular, "")],
            vec![(
                Box::leak(format!("{out}/pwned").into_boxed_str()),
                Regular,
                "",
            )],
            vec![
                ("top", Directory, ""),
                ("top/esc", Symlink, out),
                ("top/esc/pwned", Regular, ""),
            ],
            vec![
                ("top", Directory, ""),
                ("top/hard", Link, "../outside/secret"),
            ],
            vec![("top", Directory, ""), ("other/x", Regular, "")],
        ];
        std::fs::write(outside.join("secret"), b"s").unwrap();
        for (i, entries) in cases.iter().enumerate() {
            let dest = d.join(format!("dest{i}"));
            std::fs::create_dir(&dest).unwrap();
            let r = unpack(&raw_tar(entries)[..], &dest, Limits::default());
            assert!(r.is_err(), "case {i} was accepted");
            let mut names: Vec<_> = std::fs::read_dir(&outside)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            names.sort();
            assert_eq!(names, ["secret"], "case {i} wrote outside");
            assert!(
                std::fs::read_dir(&dest).unwrap().next().is_none(),
                "case {i} left files"
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! A raw disk image on the host: a regular file or a block device, opened
//! and locked once, then read and written with positioned, vectored system
//! calls straight from and into guest memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes in a virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;

/// How long to wait for a lock held by a VM that is just exiting: the
/// kernel releases it only once that process's descriptors are closed, which
/// can take a few milliseconds after its exit status is visible.
const LOCK_WAIT: Duration = Duration::from_millis(500);

/// Why a disk image cannot be used. Every message names the image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {} is not a regular file or a block device", path.display())]
    NotADisk { path: PathBuf },
    #[error(
        "disk image {} is in use by another VM or process (it holds a lock on it){}",
        path.display(),
        if *readonly { "; read-only disks can be shared only with other read-only users" } else { "" }
    )]
    Locked { path: PathBuf, readonly: bool },
    #[error("cannot lock disk image {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot find the size of disk image {}: {source}", path.display())]
    Size { path: PathBuf, source: io::Error },
}

/// An open, locked disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    readonly: bool,
    /// Size in bytes when it was opened.
    size: u64,
}

impl DiskImage {
    /// Opens `path` (read-only with `O_RDONLY` if `readonly`) and locks it:
    /// shared for a read-only image, exclusive for a writable one, so two
    /// VMs never write the same image and nobody writes an image a VM reads.
    pub fn open(path: &Path, readonly: bool) -> Result<DiskImage, DiskError> {
        let path_buf = path.to_path_buf();
        // O_NONBLOCK: opening a FIFO must not hang; cleared below.
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path_buf.clone(),
                source,
            })?;
        let kind = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: path_buf.clone(),
                source,
            })?
            .file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(DiskError::NotADisk { path: path_buf });
        }
        clear_nonblock(&file).map_err(|source| DiskError::Open {
            path: path_buf.clone(),
            source,
        })?;
        lock(&file, readonly, path)?;
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path_buf.clone(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "disk image {}: its size ({size} bytes) is not a multiple of {SECTOR_SIZE}; \
                 the guest sees {} sectors and cannot reach the last {} bytes",
                path.display(),
                size / SECTOR_SIZE,
                size % SECTOR_SIZE
            );
        }
        Ok(DiskImage {
            file,
            path: path_buf,
            readonly,
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whole 512-byte sectors in the image (a partial last sector is not
    /// part of the disk).
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Fills `iov` from the image at byte `offset`. All of it, or an error
    /// (a short read means the image shrank under us).
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for writes for its
    /// whole length while this call runs.
    pub unsafe fn read_vectored_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        // SAFETY: the caller guarantees the buffers; preadv writes only into them.
        unsafe { self.transfer(iov, offset, false) }
    }

    /// Writes `iov` to the image at byte `offset`, all of it or an error.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for reads for its
    /// whole length while this call runs.
    pub unsafe fn write_vectored_at(&self, iov: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: the caller guarantees the buffers; pwritev only reads them.
        unsafe { self.transfer(iov, offset, true) }
    }

    /// preadv/pwritev until every iovec is done. `iov` is consumed (its
    /// entries are advanced past what was transferred).
    ///
    /// # Safety
    ///
    /// As for [`Self::read_vectored_at`] / [`Self::write_vectored_at`].
    unsafe fn transfer(&self, iov: &mut [libc::iovec], offset: u64, write: bool) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut offset = offset;
        let mut rest = iov;
        while let Some(first) = rest.first() {
            if first.iov_len == 0 {
                rest = &mut rest[1..];
                continue;
            }
            let count = rest.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: `rest` holds `count` valid iovecs (`first` is the first)
            // whose buffers the caller vouches for; the kernel checks the
            // descriptor.
            // One buffer (the common case): pread/pwrite, which spare the
            // kernel copying in an iovec array.
            let n = unsafe {
                match (write, count) {
                    (false, 1) => libc::pread(fd, first.iov_base, first.iov_len, off),
                    (true, 1) => libc::pwrite(fd, first.iov_base, first.iov_len, off),
                    (false, _) => libc::preadv(fd, rest.as_ptr(), count, off),
                    (true, _) => libc::pwritev(fd, rest.as_ptr(), count, off),
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "disk image {} ends before offset {offset}",
                        self.path.display()
                    ),
                ));
            }
            let mut done = n as usize;
            offset += done as u64;
            while done > 0 {
                let Some(v) = rest.first_mut() else { break };
                if done >= v.iov_len {
                    done -= v.iov_len;
                    rest = &mut rest[1..];
                } else {
                    // SAFETY: `done` < iov_len, so the new base stays inside the buffer.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done) }.cast();
                    v.iov_len -= done;
                    done = 0;
                }
            }
        }
        Ok(())
    }

    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Gives the range back to the host file system (punches a hole): the
    /// range reads as zeros afterwards. File systems that cannot punch
    /// holes leave the data as it was, which a discard allows.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes the range read as zeros. With `unmap` the space may be given
    /// back to the host (a hole); without, it stays allocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
        // tmpfs and others: punch a hole, then allocate it again.
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {
                return match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                    Err(e) if unsupported(&e) => Ok(()),
                    other => other,
                };
            }
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
        self.write_zero_buffers(offset, len)
    }

    /// The last resort for write-zeroes: plain writes of zeros.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: fallocate on our own descriptor; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on our own descriptor.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// flock(2): shared for read-only, exclusive for writable images, without
/// blocking (but waiting up to [`LOCK_WAIT`] for a VM that is exiting).
fn lock(file: &File, readonly: bool, path: &Path) -> Result<(), DiskError> {
    let op = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    let start = Instant::now();
    loop {
        // SAFETY: flock on our own descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(libc::EWOULDBLOCK) => {
                return Err(DiskError::Locked {
                    path: path.to_path_buf(),
                    readonly,
                });
            }
            _ => {
                return Err(DiskError::Lock {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;
    use std::os::unix::fs::FileExt;

    /// A scratch image of `len` bytes in the test's temporary directory.
    /// (Its directory's guard: the directory goes when it is dropped.)
    pub(crate) fn scratch(name: &str, len: u64) -> (Scratch, PathBuf) {
        let dir = Scratch::new("disk");
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        (dir, path)
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn capacity_rounds_down_to_whole_sectors() {
        let (_dir, p) = scratch("odd.img", 5 * 512 + 100);
        let d = DiskImage::open(&p, false).unwrap();
        assert_eq!(d.sectors(), 5);
        let (_dir, p) = scratch("tiny.img", 100);
        assert_eq!(DiskImage::open(&p, true).unwrap().sectors(), 0);
    }

    #[test]
    fn vectored_io_round_trips() {
        let (_dir, p) = scratch("rw.img", 8192);
        let d = DiskImage::open(&p, false).unwrap();
        let mut a = vec![1u8; 700];
        let mut b = vec![2u8; 324];
        // SAFETY: the iovecs point into `a` and `b`, alive for the call.
        unsafe {
            d.write_vectored_at(&mut [iov(&mut a), iov(&mut b)], 512)
                .unwrap()
        };
        let mut back = vec![0u8; 1024];
        // SAFETY: as above.
        unsafe { d.read_vectored_at(&mut [iov(&mut back)], 512).unwrap() };
        assert_eq!(&back[..700], &a[..]);
        assert_eq!(&back[700..], &b[..]);
        // Reading past the end is an error, not a short read.
        let mut past = vec![0u8; 1024];
        // SAFETY: as above.
        let r = unsafe { d.read_vectored_at(&mut [iov(&mut past)], 8192 - 512) };
        assert!(r.is_err());
    }

    #[test]
    fn readonly_images_refuse_writes() {
        let (_dir, p) = scratch("ro.img", 4096);
        let d = DiskImage::open(&p, true).unwrap();
        let mut a = vec![1u8; 512];
        // SAFETY: the iovec points into `a`.
        assert!(unsafe { d.write_vectored_at(&mut [iov(&mut a)], 0) }.is_err());
        assert!(d.discard(0, 512).is_err());
        assert!(d.write_zeroes(0, 512, true).is_err());
        assert!(d.flush().is_ok());
    }

    #[test]
    fn write_zeroes_and_discard_read_back_zeros() {
        let (_dir, p) = scratch("wz.img", 1 << 20);
        let d = DiskImage::open(&p, false).unwrap();
        d.file.write_all_at(&vec![0xaa; 1 << 20], 0).unwrap();
        d.write_zeroes(4096, 8192, false).unwrap();
        d.write_zeroes(65536, 4096, true).unwrap();
        d.discard(131072, 4096).unwrap();
        let mut all = vec![0u8; 1 << 20];
        d.file.read_exact_at(&mut all, 0).unwrap();
        assert!(all[..4096].iter().all(|&b| b == 0xaa));
        assert!(all[4096..12288].iter().all(|&b| b == 0));
        assert!(all[12288..65536].iter().all(|&b| b == 0xaa));
        assert!(all[65536..69632].iter().all(|&b| b == 0));
        assert!(all[69632..131072].iter().all(|&b| b == 0xaa));
        // The file keeps its size.
        assert_eq!(d.file.metadata().unwrap().len(), 1 << 20);
        d.write_zero_buffers(0, 100).unwrap();
        d.file.read_exact_at(&mut all[..101], 0).unwrap();
        assert_eq!(&all[..101], &[&[0u8; 100][..], &[0xaa]].concat()[..]);
    }

    #[test]
    fn writable_images_are_exclusive_readonly_shared() {
        let (_dir, p) = scratch("lock.img", 4096);
        let w = DiskImage::open(&p, false).unwrap();
        let e = DiskImage::open(&p, false).unwrap_err();
        assert!(matches!(e, DiskError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("lock.img"), "{e}");
        assert!(matches!(
            DiskImage::open(&p, true).unwrap_err(),
            DiskError::Locked { .. }
        ));
        drop(w);
        let r1 = DiskImage::open(&p, true).unwrap();
        let _r2 = DiskImage::open(&p, true).unwrap();
        assert!(matches!(
            DiskImage::open(&p, false).unwrap_err(),
            DiskError::Locked { .. }
        ));
        drop(r1);
    }

    #[test]
    fn bad_paths_name_the_path() {
        let e = DiskImage::open(Path::new("/nonexistent/disk.img"), false).unwrap_err();
        assert!(matches!(e, DiskError::Open { .. }));
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
        let dir = std::env::temp_dir();
        let e = DiskImage::open(&dir, true).unwrap_err();
        assert!(matches!(e, DiskError::NotADisk { .. }), "{e}");
        // A FIFO is refused without hanging.
        let (_dir, placeholder) = scratch("fifo-placeholder", 0);
        let fifo = placeholder.with_file_name("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = DiskImage::open(&fifo, true).unwrap_err();
        assert!(matches!(e, DiskError::NotADisk { .. }), "{e}");
    }
}

//! The file system as hostile input: only regular files are read (a named pipe would block the
//! reader forever, a device file never ends), and names read from files (a sharded index's
//! `weight_map`) must stay inside the folder that holds them.

use std::fs::File;
use std::io;
use std::path::Path;

/// What a path is when it is not a regular file, for messages.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a named pipe";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// Open `path` for reading if it is a regular file (symbolic links are followed: a Hugging Face
/// cache links every file into its blob store). The type is checked before opening (a stat never
/// blocks) and again on the open handle; on Linux the open itself does not block either.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a regular file ({})", kind(&meta))));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(0o4000); // O_NONBLOCK: a file swapped for a pipe since the stat cannot hang the open
    }
    let file = opts.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a regular file ({})", kind(&meta))));
    }
    Ok(file)
}

/// Read a whole regular file of at most `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{len} bytes is more than the {max} such a file may have")));
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than the {max} bytes such a file may have")));
    }
    Ok(buf)
}

/// A relative, `/`-separated name read from a file must name something inside its folder: no
/// absolute paths, no `..`, no drive letters or backslashes, no empty or control characters.
pub fn check_relative(name: &str) -> Result<(), String> {
    let shown = crate::text::printable(name);
    if name.is_empty() || name.len() > 1024 {
        return Err(format!("file name {shown:?} is empty or too long"));
    }
    if name.starts_with('/') || name.contains('\\') || name.contains(':') || name.chars().any(char::is_control) {
        return Err(format!("file name {shown:?} points outside the model folder"));
    }
    if name.split('/').any(|seg| seg == "..") {
        return Err(format!("file name {shown:?} points outside the model folder"));
    }
    if name.split('/').any(|seg| seg.is_empty() || seg == ".") || name.ends_with('/') {
        return Err(format!("file name {shown:?} names a directory (or an empty path), not a regular file"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_folder_are_refused() {
        for bad in ["../x.safetensors", "a/../../x", "/etc/passwd", "C:\\x", "a//b", "./a", "", "a\0b", "..", "a/..", ".", "a/"] {
            assert!(check_relative(bad).is_err(), "{bad:?}");
        }
        assert!(check_relative(".").unwrap_err().contains("directory"));
        assert!(check_relative("../a").unwrap_err().contains("outside"));
        for good in ["diffusion_pytorch_model-00001-of-00002.safetensors", "sub/x.bin", "a..b.safetensors"] {
            assert!(check_relative(good).is_ok(), "{good:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn pipes_devices_and_folders_are_not_opened() {
        let dir = std::env::temp_dir().join(format!("visii-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("pipe");
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("named pipe"), "{e}");
        let link = dir.join("zero");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(open_regular(&link).unwrap_err().to_string().contains("device"));
        assert!(open_regular(&dir).unwrap_err().to_string().contains("folder"));
        std::fs::write(dir.join("big"), vec![0u8; 100]).unwrap();
        assert!(read_regular(&dir.join("big"), 99).is_err());
        assert_eq!(read_regular(&dir.join("big"), 100).unwrap().len(), 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

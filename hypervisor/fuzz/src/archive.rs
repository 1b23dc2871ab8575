//! The ramdisk reader on arbitrary bytes: never panics; an accepted archive
//! yields unique names whose bytes lie inside the input.

use hypervisor::loader::archive::Archive;

pub fn archive(data: &[u8]) {
    let Ok(archive) = Archive::new(data) else {
        return;
    };
    let input = data.as_ptr_range();
    assert_eq!(archive.files().len(), archive.len());
    for (name, bytes) in archive.files() {
        assert!(!name.is_empty());
        let inside = bytes.as_ptr_range();
        assert!(input.start <= inside.start && inside.end <= input.end);
        assert_eq!(archive.get(name).map(<[u8]>::as_ptr), Some(bytes.as_ptr()));
    }
}

//! The eBPF object built by build.rs and embedded in the binary.

pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loopback.bpf.o"));

pub fn check_built() -> anyhow::Result<&'static [u8]> {
    if OBJECT.is_empty() {
        anyhow::bail!(
            "this lotrace was built without its eBPF programs (stub object); build it with `cargo xtask build`"
        );
    }
    Ok(OBJECT)
}

//! Peak memory while model weights load (glibc only).
//!
//! Loading an encoder creates each weight tensor, then replaces many of them with repacked
//! copies while optimising the graph. With glibc's default dynamic mmap threshold, freed
//! tensors of a few MB stay in the heap as fragments the differently sized replacements cannot
//! reuse: a ViT-L/14-336 tower (1.25 GB of weights) peaked at 1.5× its weight bytes. Serving
//! every allocation of 1 MiB or more from its own mapping while loading returns each freed
//! tensor to the system at once (peak 1.08×). Afterwards the two thresholds go where glibc's
//! dynamic rule settles on this workload anyway — mmap at its upper bound (32 MiB on 64-bit),
//! trim at twice that — so per-frame activations keep coming from the heap without the heap
//! being shrunk and faulted back in on every frame, and running stays as fast as before
//! (setting the mmap threshold by hand freezes the trim threshold at 128 KiB otherwise: a
//! ViT-B/16 frame took 20 % longer that way).

/// Threshold while loading: weight tensors and their transient copies are larger.
const LOADING_MMAP_THRESHOLD: i32 = 1 << 20;
/// Threshold after loading: glibc's DEFAULT_MMAP_THRESHOLD_MAX for 64-bit targets.
const RUNNING_MMAP_THRESHOLD: i32 = 32 << 20;
/// Heap top kept after loading: twice the mmap threshold, as glibc's dynamic rule sets it.
const RUNNING_TRIM_THRESHOLD: i32 = 2 * RUNNING_MMAP_THRESHOLD;

/// Run `load` with large allocations served by their own mappings (see the module docs).
/// Elsewhere than glibc this only runs `load`.
pub fn loading_weights<T>(load: impl FnOnce() -> T) -> T {
    set(Param::MmapThreshold, LOADING_MMAP_THRESHOLD);
    let out = load();
    set(Param::MmapThreshold, RUNNING_MMAP_THRESHOLD);
    set(Param::TrimThreshold, RUNNING_TRIM_THRESHOLD);
    out
}

#[derive(Debug, Clone, Copy)]
enum Param {
    MmapThreshold,
    TrimThreshold,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(param: Param, bytes: i32) {
    let which = match param {
        Param::MmapThreshold => libc::M_MMAP_THRESHOLD,
        Param::TrimThreshold => libc::M_TRIM_THRESHOLD,
    };
    // SAFETY: mallopt only changes glibc allocator parameters; glibc documents it MT-Safe and it
    // takes no pointers. M_MMAP_THRESHOLD accepts values up to HEAP_MAX_SIZE / 2 (32 MiB is
    // glibc's own dynamic upper bound), M_TRIM_THRESHOLD any value. Memory already allocated is
    // unaffected: free() tells mapped chunks from heap chunks by their header, not by the
    // threshold.
    let ok = unsafe { libc::mallopt(which, bytes) };
    if ok != 1 {
        log::debug!("mallopt({param:?}, {bytes}) was refused; allocator left as it was");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set(_param: Param, _bytes: i32) {}

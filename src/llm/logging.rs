//! llama.cpp and ggml log through one C callback; this forwards whole lines to the `log` crate
//! and remembers the last error line so load failures can say why they failed.

use llama_cpp_sys_2 as sys;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, Once};

struct LineBuffer {
    level: sys::ggml_log_level,
    text: String,
}

static BUFFER: Mutex<LineBuffer> = Mutex::new(LineBuffer {
    level: sys::GGML_LOG_LEVEL_INFO,
    text: String::new(),
});
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());
/// Extra receiver of every whole line (e.g. quantisation progress), while one is installed.
type Observer = Box<dyn FnMut(&str) + Send>;
static OBSERVER: Mutex<Option<Observer>> = Mutex::new(None);
static INIT: Once = Once::new();

/// Initialise llama.cpp's backends once per process and route its logging to `log`.
pub(crate) fn init_backend() {
    INIT.call_once(|| {
        // SAFETY: `forward` is a plain `extern "C"` function valid for the whole program and
        // needs no user data; llama_log_set stores the pointer in a global. llama_backend_init
        // has no preconditions and is called exactly once here (guarded by `Once`).
        unsafe {
            sys::llama_log_set(Some(forward), std::ptr::null_mut());
            sys::llama_backend_init();
        }
    });
}

/// The last ERROR line llama.cpp logged, taken (cleared) by the caller.
pub(crate) fn take_last_error() -> Option<String> {
    let mut last = LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    (!last.is_empty()).then(|| std::mem::take(&mut *last))
}

/// Run `f` with `observer` receiving every line llama.cpp logs meanwhile (any level).
pub(crate) fn observe_lines<R>(observer: Observer, f: impl FnOnce() -> R) -> R {
    *OBSERVER.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer);
    let result = f();
    // Flush a last line still in the buffer to the observer before removing it.
    let pending = {
        let mut buf = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
        (!buf.text.is_empty()).then(|| (buf.level, std::mem::take(&mut buf.text)))
    };
    if let Some((level, line)) = pending {
        emit(level, &line);
    }
    *OBSERVER.lock().unwrap_or_else(|e| e.into_inner()) = None;
    result
}

/// Forget any earlier error line, so a later failure does not report a stale one.
pub(crate) fn clear_last_error() {
    LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

unsafe extern "C" fn forward(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for the duration of the call;
    // it is only read here and copied into an owned String.
    let piece = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    // Never unwind into C: a poisoned lock is still usable for a log buffer.
    let mut buf = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    if level != sys::GGML_LOG_LEVEL_CONT {
        if !buf.text.is_empty() {
            let (lvl, line) = (buf.level, std::mem::take(&mut buf.text));
            emit(lvl, &line);
        }
        buf.level = level;
    }
    buf.text.push_str(&piece);
    if buf.text.ends_with('\n') {
        let (lvl, line) = (buf.level, std::mem::take(&mut buf.text));
        emit(lvl, &line);
    }
}

fn emit(level: sys::ggml_log_level, line: &str) {
    let line = line.trim_end();
    if line.is_empty() {
        return;
    }
    if let Some(observer) = OBSERVER.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        observer(line);
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => {
            log::error!(target: "llama.cpp", "{line}");
            *LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = line.to_string();
        }
        sys::GGML_LOG_LEVEL_WARN => log::warn!(target: "llama.cpp", "{line}"),
        // llama.cpp's INFO is a page per model load: debug level keeps the daemon's log readable.
        sys::GGML_LOG_LEVEL_INFO => log::debug!(target: "llama.cpp", "{line}"),
        _ => log::trace!(target: "llama.cpp", "{line}"),
    }
}

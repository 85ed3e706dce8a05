//! nbdnats core: NBD block streams over the NATS data plane. This file only registers the
//! Python module; each concept lives in its own module.

pub mod bridge;
pub mod checksum;
pub mod compress;
pub mod conn;
pub mod digest;
pub mod error;
pub mod extents;
pub mod faults;
pub mod frame;
pub mod handshake;
pub mod io;
pub mod journal;
mod libnbd;
pub mod link;
mod micro;
pub mod pool;
pub mod push;
mod py;
pub mod rate;
pub mod recv;
pub mod relay;
pub mod send;
pub mod stats;
pub mod stripe;
pub mod striped;
pub mod window;

use pyo3::prelude::*;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    py::register(m)?;
    micro::register(m)
}

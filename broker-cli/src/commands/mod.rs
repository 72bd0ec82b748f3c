//! One module per command (the demo has its own folder, `demo/`).

pub(crate) mod bench;
pub(crate) mod list;
pub(crate) mod publish;
pub(crate) mod subscribe;

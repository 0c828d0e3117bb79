//! The building blocks every export and import format shares: writing (`writer`), reading
//! (`reader`), staging rows into the store (`staging`), and streaming tables by binary COPY
//! (`copy_binary`). Formats build on them; nothing here knows a particular format.

pub(crate) mod copy_binary;
pub(crate) mod reader;
pub(crate) mod staging;
pub(crate) mod stream;
pub(crate) mod writer;

//! The building blocks every export and import format shares: writing (`writer`), reading
//! (`reader`), staging rows into the store (`staging`), streaming tables by binary COPY
//! (`copy_binary`), and keeping only a restore in part's rows (`selection`). Formats build on them;
//! nothing here knows a particular format.

pub(crate) mod copy_binary;
pub(crate) mod reader;
pub(crate) mod selection;
pub(crate) mod staging;
pub(crate) mod stream;
pub(crate) mod writer;

pub fn placeholder_until_written() {}

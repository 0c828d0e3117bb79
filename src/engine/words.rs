//! Counts in messages, said as people say them.

/// "1 environment", "2 environments", "1 batch", "0 state IDs": a count with its noun (given in
/// the plural) in the right number.
pub fn counted(n: u64, plural: &str) -> String {
    if n != 1 {
        return format!("{n} {plural}");
    }
    if let Some(stem) = plural.strip_suffix("ies") {
        return format!("1 {stem}y");
    }
    let singular = ["ches", "shes", "sses", "xes"]
        .iter()
        .find(|end| plural.ends_with(*end))
        .map(|_| &plural[..plural.len() - 2])
        .or_else(|| plural.strip_suffix('s'))
        .unwrap_or(plural);
    format!("1 {singular}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_say_their_noun_in_the_right_number() {
        assert_eq!(super::counted(1, "environments"), "1 environment");
        assert_eq!(super::counted(2, "environments"), "2 environments");
        assert_eq!(super::counted(0, "state IDs"), "0 state IDs");
        assert_eq!(super::counted(1, "state IDs"), "1 state ID");
        assert_eq!(super::counted(1, "batches"), "1 batch");
        assert_eq!(super::counted(1, "rows"), "1 row");
        assert_eq!(super::counted(1, "identities"), "1 identity");
    }
}

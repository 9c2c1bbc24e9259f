//! The one reader of the process environment for commands (link variables, seeds, the etcd
//! link). `std::env::vars()` panics on a variable whose name or value is not UTF-8, and any
//! container can carry one unrelated to us; here such a variable is converted lossily instead,
//! so it cannot abort the process, and a malformed link variable still reaches `link_env`, which
//! reports it by name.

/// Every variable of the process environment, names and values converted lossily to UTF-8.
pub(crate) fn vars() -> Vec<(String, String)> {
    lossy(std::env::vars_os())
}

/// One variable of the process environment, converted lossily to UTF-8.
pub(crate) fn var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

fn lossy(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(String, String)> {
    vars.into_iter()
        .map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn non_utf8_variables_are_converted_not_fatal() {
        let vars = super::lossy([
            (OsString::from("A"), OsString::from("1")),
            (OsString::from("B"), OsString::from_vec(b"x\xffy".to_vec())),
            (OsString::from_vec(b"C\xfe".to_vec()), OsString::from("2")),
        ]);
        assert_eq!(
            vars,
            [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "x\u{fffd}y".to_owned()),
                ("C\u{fffd}".to_owned(), "2".to_owned()),
            ]
        );
    }
}

//! A user's key permissions as sets of key intervals, and etcd's checks against them
//! (`auth/range_perm_cache.go`).
//!
//! - A permission with no range end is the one key `[key, key\0)`; a range end of `"\0"` is
//!   every key from `key` on; otherwise `[key, range_end)`.
//! - A request with no range end is a point: allowed if any interval holds the key. A range is
//!   allowed only if the union of the intervals covers all of it; intervals that touch
//!   (`[a, b)` and `[b, c)`) join, as in etcd's interval tree.

use keel_proto::authpb;

/// The end of an interval: a key (exclusive), or past every key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Unbounded,
}

/// Disjoint, sorted, non-touching intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Intervals(Vec<(Vec<u8>, End)>);

fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    let end = match range_end {
        [] => {
            let mut k = key.to_vec();
            k.push(0);
            End::Key(k)
        }
        [0] => End::Unbounded,
        e => End::Key(e.to_vec()),
    };
    (key.to_vec(), end)
}

impl Intervals {
    /// The union of the intervals.
    fn from_unsorted(mut v: Vec<(Vec<u8>, End)>) -> Intervals {
        v.retain(|(s, e)| match e {
            End::Key(e) => s < e,
            End::Unbounded => true,
        });
        v.sort();
        let mut out: Vec<(Vec<u8>, End)> = Vec::with_capacity(v.len());
        for (start, end) in v {
            if let Some(last) = out.last_mut() {
                let touches = match &last.1 {
                    End::Unbounded => true,
                    End::Key(e) => start <= *e,
                };
                if touches {
                    if end > last.1 {
                        last.1 = end;
                    }
                    continue;
                }
            }
            out.push((start, end));
        }
        Intervals(out)
    }

    /// The interval that holds `key`, if any.
    fn holding(&self, key: &[u8]) -> Option<&End> {
        let i = self.0.partition_point(|(s, _)| s.as_slice() <= key);
        let (_, end) = self.0.get(i.checked_sub(1)?)?;
        match end {
            End::Unbounded => Some(end),
            End::Key(e) => (key < e.as_slice()).then_some(end),
        }
    }

    /// Whether the request `[key, range_end)` (etcd's encoding, as in a RangeRequest) is covered.
    pub fn allows(&self, key: &[u8], range_end: &[u8]) -> bool {
        if range_end.is_empty() {
            return self.holding(key).is_some();
        }
        let (_, want) = interval(key, range_end);
        if let End::Key(e) = &want
            && e.as_slice() <= key
        {
            // An empty range: etcd's interval tree finds nothing to cover, and refuses.
            return false;
        }
        self.holding(key).is_some_and(|have| *have >= want)
    }
}

/// A user's read and write intervals: the union over the permissions of its roles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPerms {
    pub read: Intervals,
    pub write: Intervals,
}

impl UserPerms {
    /// The permissions of `roles` put together (`READWRITE` counts for both).
    pub fn of<'a>(roles: impl IntoIterator<Item = &'a authpb::Role>) -> UserPerms {
        let (mut read, mut write) = (Vec::new(), Vec::new());
        for role in roles {
            for p in &role.key_permission {
                let i = interval(&p.key, &p.range_end);
                match authpb::permission::Type::try_from(p.perm_type) {
                    Ok(authpb::permission::Type::Read) => read.push(i),
                    Ok(authpb::permission::Type::Write) => write.push(i),
                    Ok(authpb::permission::Type::Readwrite) => {
                        read.push(i.clone());
                        write.push(i);
                    }
                    Err(_) => {}
                }
            }
        }
        UserPerms {
            read: Intervals::from_unsorted(read),
            write: Intervals::from_unsorted(write),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(perms: &[(&str, &str)]) -> Intervals {
        Intervals::from_unsorted(
            perms
                .iter()
                .map(|(k, e)| interval(k.as_bytes(), e.as_bytes()))
                .collect(),
        )
    }

    #[test]
    fn points_and_ranges_as_etcd_checks_them() {
        let s = set(&[("a", "c"), ("c", "d"), ("x", ""), ("p", "\0")]);
        // Points.
        assert!(s.allows(b"a", b""));
        assert!(s.allows(b"b", b""));
        assert!(s.allows(b"c5", b""));
        assert!(!s.allows(b"d", b""));
        assert!(s.allows(b"x", b""));
        assert!(!s.allows(b"e", b""));
        assert!(s.allows(b"zzz", b""), "from p on");
        // Ranges: touching intervals join; a gap refuses.
        assert!(s.allows(b"a", b"d"));
        assert!(!s.allows(b"a", b"e"));
        assert!(s.allows(b"q", b"\0"), "open-ended inside an open-ended one");
        assert!(!s.allows(b"a", b"\0"));
        assert!(!s.allows(b"b", b"a"), "an empty range");
        // A single key permission covers only that key as a range too.
        let one = set(&[("x", "")]);
        assert!(one.allows(b"x", b"x\0"));
        assert!(!one.allows(b"x", b"y"));
        assert!(!one.allows(b"x0", b""));
    }

    #[test]
    fn roles_union_and_readwrite_counts_twice() {
        use authpb::permission::Type;
        let perm = |t: Type, k: &str, e: &str| authpb::Permission {
            perm_type: t as i32,
            key: k.into(),
            range_end: e.into(),
        };
        let r1 = authpb::Role {
            name: b"r1".to_vec(),
            key_permission: vec![perm(Type::Read, "a", "b"), perm(Type::Readwrite, "k", "")],
        };
        let r2 = authpb::Role {
            name: b"r2".to_vec(),
            key_permission: vec![perm(Type::Write, "b", "c")],
        };
        let u = UserPerms::of([&r1, &r2]);
        assert!(u.read.allows(b"a", b"b"));
        assert!(!u.read.allows(b"a", b"c"));
        assert!(u.write.allows(b"b", b"c"));
        assert!(u.write.allows(b"k", b""));
        assert!(u.read.allows(b"k", b""));
        assert!(!u.write.allows(b"a", b""));
    }
}

//! Alarms (etcd's `v3alarm.AlarmStore`): a member's NOSPACE or CORRUPT condition, raised and
//! cleared through raft so every member holds the same set, and kept in the backend.
//!
//! On disk, as etcd: the `alarm` bucket holds one key per alarm, the protobuf encoding of
//! `etcdserverpb.AlarmMember {memberID, alarm}`, with an empty value.
//!
//! While NOSPACE is active, puts, txns that put and lease grants are refused when applied
//! (etcd's `applierV3Capped`); while CORRUPT is active, every write is (`applierV3Corrupt`).

use std::collections::BTreeSet;

use keel_engine::mvcc::{ReadView, WriteTxn};
use keel_engine::{Error, Result};
use keel_proto::etcdserverpb as pb;
use prost::Message as _;

/// The backend bucket.
pub const ALARM_BUCKET: &[u8] = b"alarm";

/// The active alarms: (member ID, alarm type).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alarms {
    set: BTreeSet<(u64, i32)>,
}

fn member(id: u64, alarm: i32) -> pb::AlarmMember {
    pb::AlarmMember {
        member_id: id,
        alarm,
    }
}

impl Alarms {
    /// The alarms recorded in the backend.
    pub fn load(view: &ReadView) -> Result<Alarms> {
        let mut set = BTreeSet::new();
        for (k, _) in view.raw_range(ALARM_BUCKET)? {
            let m = pb::AlarmMember::decode(k.as_slice())
                .map_err(|e| Error::CorruptRecord(format!("alarm bucket entry: {e}")))?;
            set.insert((m.member_id, m.alarm));
        }
        Ok(Alarms { set })
    }

    /// The alarms of type `kind` (every alarm for `NONE`), as etcd's `Get`.
    pub fn get(&self, kind: i32) -> Vec<pb::AlarmMember> {
        self.set
            .iter()
            .filter(|(_, a)| kind == pb::AlarmType::None as i32 || *a == kind)
            .map(|&(id, a)| member(id, a))
            .collect()
    }

    /// Whether an alarm of type `kind` is active on any member.
    pub fn active(&self, kind: pb::AlarmType) -> bool {
        self.set.iter().any(|(_, a)| *a == kind as i32)
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Raises alarm `kind` for member `id` (a second raise of the same alarm changes nothing):
    /// the alarm.
    pub fn activate(
        &mut self,
        w: &mut WriteTxn<'_>,
        id: u64,
        kind: i32,
    ) -> Result<pb::AlarmMember> {
        let m = member(id, kind);
        if self.set.insert((id, kind)) {
            w.put_raw(ALARM_BUCKET, &m.encode_to_vec(), b"")?;
        }
        Ok(m)
    }

    /// Clears alarm `kind` of member `id`: the alarm, if it was active.
    pub fn deactivate(
        &mut self,
        w: &mut WriteTxn<'_>,
        id: u64,
        kind: i32,
    ) -> Result<Option<pb::AlarmMember>> {
        if !self.set.remove(&(id, kind)) {
            return Ok(None);
        }
        let m = member(id, kind);
        w.delete_raw(ALARM_BUCKET, &m.encode_to_vec())?;
        Ok(Some(m))
    }

    /// Each alarm as etcd's `Status` lists it in `errors` (Go's compact protobuf text).
    pub fn describe(&self) -> Vec<String> {
        self.set
            .iter()
            .map(|&(id, a)| format!("memberID:{id} alarm:{} ", name(a)))
            .collect()
    }
}

/// etcd's name of an alarm type (its number if unknown).
pub fn name(alarm: i32) -> String {
    match pb::AlarmType::try_from(alarm) {
        Ok(t) => t.as_str_name().to_string(),
        Err(_) => alarm.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_etcds_encoding_and_text_is_gos() {
        // etcd 3.4 stores `AlarmMember{MemberID: 1, Alarm: NOSPACE}` as these bytes.
        assert_eq!(member(1, 1).encode_to_vec(), vec![0x08, 0x01, 0x10, 0x01]);
        let mut a = Alarms::default();
        a.set
            .insert((10276657743932975437, pb::AlarmType::Nospace as i32));
        assert_eq!(
            a.describe(),
            vec!["memberID:10276657743932975437 alarm:NOSPACE ".to_string()]
        );
        assert!(a.active(pb::AlarmType::Nospace));
        assert!(!a.active(pb::AlarmType::Corrupt));
        assert_eq!(a.get(pb::AlarmType::None as i32).len(), 1);
        assert_eq!(a.get(pb::AlarmType::Corrupt as i32).len(), 0);
    }
}

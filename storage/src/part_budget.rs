//! The room all of a process's uploads share for their part buffers: a part is read only
//! once there is room for it, so sixteen copies of very large files at once (a 5 TiB
//! file's parts are 525 MiB each) take turns instead of exhausting the host's memory.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per unit of the budget: parts are counted to the KiB.
const UNIT: usize = 1024;

/// The most bytes of part buffers all uploads of a store hold at once (the store options'
/// `part_memory_mib`). Clones share one budget.
#[derive(Clone, Debug)]
pub struct PartBudget {
    room: Arc<Semaphore>,
    units: u32,
}

/// A buffer's share of the budget, given back when dropped (after its part is uploaded).
#[derive(Debug)]
pub struct Room {
    _permit: Option<OwnedSemaphorePermit>,
}

impl PartBudget {
    /// A budget of `mib` MiB (at least one KiB).
    pub fn new(mib: u64) -> Self {
        let units = u32::try_from(mib.saturating_mul(1024)).unwrap_or(u32::MAX >> 3);
        let units = units.clamp(1, (Semaphore::MAX_PERMITS as u32).min(u32::MAX >> 3));
        Self {
            room: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// Waits for room for `bytes`. A buffer larger than the whole budget takes all of it:
    /// it is read once nothing else is held, so no part is ever refused.
    pub async fn take(&self, bytes: usize) -> Room {
        // The empty read that ends a file holds nothing (and must not wait behind a large
        // part for room it does not use, nor hold any through the upload's completion).
        if bytes == 0 {
            return Room { _permit: None };
        }
        let want = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.units);
        // Never closed: an error cannot happen, and would only lift the bound.
        Room {
            _permit: self.room.clone().acquire_many_owned(want).await.ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PartBudget;
    use futures_util::FutureExt as _;

    #[test]
    fn a_part_waits_for_room_and_one_larger_than_the_budget_takes_it_all() {
        let budget = PartBudget::new(8);
        let a = budget
            .take(5 << 20)
            .now_or_never()
            .expect("room for the first");
        assert!(
            budget.take(5 << 20).now_or_never().is_none(),
            "a second 5 MiB part waits while the first is held"
        );
        let small = budget
            .take(3 << 20)
            .now_or_never()
            .expect("3 MiB still fit");
        drop(a);
        drop(small);
        let all = budget
            .take(1 << 30)
            .now_or_never()
            .expect("a 1 GiB part takes all 8");
        assert!(budget.take(1).now_or_never().is_none(), "nothing left");
        assert!(
            budget.take(0).now_or_never().is_some(),
            "the empty read at a file's end takes no room"
        );
        drop(all);
        assert!(budget.take(8 << 20).now_or_never().is_some());
    }
}

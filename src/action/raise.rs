//! The `raise_limit` action: lends headroom through the [`LoanBook`](crate::loan::LoanBook)
//! and reports what it did. The loans themselves (journal, return, keeper) live in
//! [`crate::loan`].

use super::{Env, Outcome, Report, StepCtx};
use crate::loan::Lend;
use crate::policy::Raise;

/// Runs a `raise_limit` step.
pub fn perform(env: &Env, ctx: &StepCtx, r: &Raise) -> Report {
    if ctx.resuming {
        return Report::skipped("resuming after the hold expired: no further raise");
    }
    let res = env.loans.lend(
        env.ctl.as_ref(),
        ctx.cgroup,
        &ctx.policy.name,
        r,
        ctx.episode,
        // Journaled 0: resume after the policy's first raise_limit (see resume_step).
        if ctx.early { 0 } else { ctx.step + 1 },
        ctx.audit,
    );
    match res {
        Ok(Lend::Raised { old, new }) => Report::new(Outcome::Done)
            .with("old_limit", old)
            .with("new_limit", new),
        Ok(Lend::Would { old, new }) => Report::new(Outcome::Would)
            .with("old_limit", old)
            .with("new_limit", new),
        Ok(Lend::AtCeiling { limit, ceiling }) => {
            Report::skipped(format!("limit {limit} is already at the ceiling {ceiling}"))
                .with("old_limit", limit)
                .with("new_limit", limit)
        }
        Ok(Lend::Unlimited) => Report::skipped("the limit is unlimited: nothing to raise"),
        Err(e) => Report::failed(e),
    }
}

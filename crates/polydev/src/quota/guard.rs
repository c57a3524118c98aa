//! [`ReservationGuard`]: a reserved unit that goes back to its counter unless the work it paid
//! for is done.

use sqlx::PgPool;

use super::{Reservation, refund};

/// A reservation that is given back unless settled, even when the future holding it is
/// dropped (client cancellation): then the refund runs in a background task.
pub struct ReservationGuard {
    pool: PgPool,
    reservation: Option<Reservation>,
}

impl ReservationGuard {
    /// Guards `reservation`; a refund goes through `pool`.
    pub fn new(pool: &PgPool, reservation: Reservation) -> Self {
        ReservationGuard {
            pool: pool.clone(),
            reservation: Some(reservation),
        }
    }

    /// The guarded unit (its id settles it in the statement that records the work).
    pub fn reservation(&self) -> Option<&Reservation> {
        self.reservation.as_ref()
    }

    /// The work was done (its usage row settled the unit): the unit stays used.
    pub fn settle(mut self) {
        self.reservation = None;
    }

    /// The work did not happen: the unit goes back now.
    pub async fn refund(mut self) {
        if let Some(reservation) = self.reservation.take()
            && let Err(error) = refund(&self.pool, &reservation).await
        {
            tracing::error!(%error, "quota refund failed");
        }
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            let pool = self.pool.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(error) = refund(&pool, &reservation).await {
                        tracing::error!(%error, "quota refund after cancellation failed");
                    }
                });
            }
        }
    }
}

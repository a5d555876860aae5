//! A small blocking connection pool: at most `max` connections, made on demand, handed out one
//! caller at a time and returned on drop (unless the caller marks one broken).

use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};

pub(crate) struct Pool<C> {
    state: Mutex<State<C>>,
    freed: Condvar,
    max: usize,
}

struct State<C> {
    idle: Vec<C>,
    /// Connections that exist, idle or lent out.
    open: usize,
}

impl<C> Pool<C> {
    pub(crate) fn new(max: usize) -> Self {
        Pool {
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // A panic while holding this lock cannot leave the state inconsistent (every update is
        // a single push/pop/counter change), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an idle connection, or makes one with `connect` if below the cap, or waits.
    pub(crate) fn get<E>(
        &self,
        connect: impl FnOnce() -> Result<C, E>,
    ) -> Result<Pooled<'_, C>, E> {
        let mut st = self.lock();
        loop {
            if let Some(c) = st.idle.pop() {
                return Ok(Pooled {
                    pool: self,
                    conn: Some(c),
                });
            }
            if st.open < self.max {
                st.open += 1;
                drop(st);
                return match connect() {
                    Ok(c) => Ok(Pooled {
                        pool: self,
                        conn: Some(c),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl<C> Pool<C> {
    /// Removes and returns every idle connection.
    pub(crate) fn take_idle(&self) -> Vec<C> {
        let mut st = self.lock();
        let idle = std::mem::take(&mut st.idle);
        st.open -= idle.len();
        idle
    }
}

/// A connection lent by a [`Pool`].
pub(crate) struct Pooled<'a, C> {
    pool: &'a Pool<C>,
    conn: Option<C>,
}

impl<C> Pooled<'_, C> {
    /// Drops the connection instead of returning it (after an I/O error, say).
    pub(crate) fn discard(mut self) {
        self.conn = None;
    }
}

impl<C> Deref for Pooled<'_, C> {
    type Target = C;
    fn deref(&self) -> &C {
        // `conn` is only None after `discard` (which consumes self) or inside drop.
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl<C> DerefMut for Pooled<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl<C> Drop for Pooled<'_, C> {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        match self.conn.take() {
            Some(c) => st.idle.push(c),
            None => st.open -= 1,
        }
        drop(st);
        self.pool.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reuses_and_caps() {
        let pool = Arc::new(Pool::new(2));
        let mut made = 0;
        {
            let a = pool
                .get(|| {
                    Ok::<_, ()>({
                        made += 1;
                        made
                    })
                })
                .unwrap();
            let b = pool
                .get(|| {
                    Ok::<_, ()>({
                        made += 1;
                        made
                    })
                })
                .unwrap();
            assert_eq!((*a, *b), (1, 2));
        }
        let c = pool.get(|| Ok::<_, ()>(99)).unwrap();
        assert!(*c == 1 || *c == 2);
        c.discard();
        let d = pool.get(|| Ok::<_, ()>(3)).unwrap();
        let e = pool.get(|| Ok::<_, ()>(4)).unwrap();
        assert_eq!(*e, 4, "a new connection replaces the discarded one");
        // A third caller waits until one is returned.
        let p2 = pool.clone();
        let t = std::thread::spawn(move || *p2.get(|| Ok::<_, ()>(5)).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(d);
        let got = t.join().unwrap();
        assert_ne!(got, 5);
        drop(e);
        assert!(pool.get(|| Err::<i32, _>("refused")).is_ok());
    }
}

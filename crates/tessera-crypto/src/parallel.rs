//! Fan-out work (one HPKE seal per recipient card) on several threads.

/// From this many items on, the work runs on several threads: each item is
/// an independent X25519 agreement (and, for sender keys, a signature), the
/// whole cost of a large fan-out.
const PARALLEL_FROM: usize = 16;

/// `items.map(f)`, in order, on up to 8 threads for large inputs; the first
/// error wins. `joined` is the error for a worker thread that panicked.
pub(crate) fn try_map<T, R, E>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, E> + Sync,
    joined: impl Fn() -> E,
) -> Result<Vec<R>, E>
where
    T: Sync,
    R: Send,
    E: Send,
{
    let threads = if items.len() >= PARALLEL_FROM {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    } else {
        1
    };
    if threads <= 1 {
        return items.iter().map(&f).collect();
    }
    let per_thread = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let mut parts = items.chunks(per_thread);
        let first = parts.next().unwrap_or_default();
        let handles: Vec<_> = parts
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Result<Vec<_>, _>>()))
            .collect();
        // The calling thread takes the first share itself.
        let mut out: Vec<R> = first.iter().map(f).collect::<Result<_, _>>()?;
        out.reserve(items.len() - out.len());
        for handle in handles {
            out.extend(handle.join().map_err(|_| joined())??);
        }
        Ok(out)
    })
}

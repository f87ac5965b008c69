//! Reading PostgreSQL's pointer Lists (parse trees hold their nodes in them).

use pgrx::pg_sys;

/// The elements of a pointer List, as pointers to `T` (none for NIL).
///
/// # Safety
/// `list` must be NIL or a valid List of pointers to `T`.
pub unsafe fn pointers<T>(list: *mut pg_sys::List) -> Vec<*mut T> {
    if list.is_null() {
        return Vec::new();
    }
    // SAFETY: a pointer list has `length` elements (caller's contract).
    unsafe { (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).ptr_value.cast::<T>()).collect() }
}

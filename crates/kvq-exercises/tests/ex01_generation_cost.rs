use kvq_exercises::ex01_generation_cost::*;

#[test]
fn small_cases() {
    assert_eq!(positions_without_cache(5, 1), 5);
    assert_eq!(positions_without_cache(5, 3), 5 + 6 + 7);
    assert_eq!(positions_with_cache(5, 1), 5);
    assert_eq!(positions_with_cache(5, 3), 5 + 1 + 1);
    assert_eq!(positions_with_cache(5, 0), 0);
    assert_eq!(positions_without_cache(5, 0), 0);
}

#[test]
fn quadratic_without_linear_with() {
    // From a one-token prompt, doubling n doubles the cached work and ~quadruples the rest.
    let (a, b) = (positions_without_cache(1, 1000), positions_without_cache(1, 2000));
    assert!((b as f64 / a as f64 - 4.0).abs() < 0.01);
    let (c, d) = (positions_with_cache(1, 1000), positions_with_cache(1, 2000));
    assert!((d as f64 / c as f64 - 2.0).abs() < 0.01);
    assert_eq!(positions_without_cache(1, 2048), 2048 * 2049 / 2);
}

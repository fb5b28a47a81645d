use kvq::quant::outliers::split_by_magnitude;
use kvq::rng::SplitMix64;
use kvq_exercises::ex06_outliers::top_k_outliers;

#[test]
fn small_case() {
    assert_eq!(top_k_outliers(&[0.1, -5.0, 2.0, 4.0], 2), vec![1, 3]);
    assert_eq!(top_k_outliers(&[1.0, -1.0, 1.0], 2), vec![0, 1]);
    assert!(top_k_outliers(&[1.0, 2.0], 0).is_empty());
}

#[test]
fn same_choice_as_kvq() {
    let mut rng = SplitMix64::new(6);
    for k in [1usize, 3, 10] {
        let xs: Vec<f32> = (0..64).map(|_| rng.normal()).collect();
        let (_, sparse) = split_by_magnitude(&xs, k, 0.0).unwrap();
        let want: Vec<usize> = sparse.index.iter().map(|&i| i as usize).collect();
        assert_eq!(top_k_outliers(&xs, k), want);
    }
}

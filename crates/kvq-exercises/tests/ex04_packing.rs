use kvq_exercises::ex04_packing::{pack2, unpack2};

#[test]
fn same_bytes_as_kvq() {
    for n in [0usize, 1, 3, 4, 5, 31, 32, 33, 130] {
        let codes: Vec<u8> = (0..n).map(|i| ((i * 7 + 1) % 4) as u8).collect();
        let packed = pack2(&codes);
        assert_eq!(packed, kvq::quant::pack(&codes, 2).unwrap(), "{n} codes");
        assert_eq!(unpack2(&packed, n), codes);
    }
}

#[test]
fn bit_order() {
    assert_eq!(pack2(&[1, 2, 3, 0]), vec![0b00_11_10_01]);
    assert_eq!(pack2(&[3]), vec![3]);
}

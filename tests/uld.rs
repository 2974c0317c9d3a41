//! The Universal Logit Distillation loss against PyTorch (tests/fixtures/uld, made by
//! make_uld_fixture.py): values at two temperatures, either vocabulary the larger, and the
//! gradient of the mean over rows.

mod common;

use candle_core::Var;
use common::{expected, max_abs_diff};
use mmkd::distill::uld::uld_rows;

#[test]
fn uld_matches_pytorch_values_and_gradients() {
    let fx = expected("uld");
    let (student, teacher) = (&fx["student"], &fx["teacher"]);
    for (name, temperature) in [("t1", 1.0), ("t2", 2.0)] {
        let var = Var::from_tensor(student).unwrap();
        let value = uld_rows(var.as_tensor(), teacher, temperature).unwrap();
        assert!(
            max_abs_diff(&value, &fx[&format!("uld_{name}")]) < 1e-12,
            "T = {temperature}"
        );
        let grads = value.mean_all().unwrap().backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap();
        assert!(
            max_abs_diff(grad, &fx[&format!("grad_mean_{name}")]) < 1e-12,
            "gradient at T = {temperature}"
        );
    }
    let swapped = uld_rows(teacher, student, 1.0).unwrap();
    assert!(max_abs_diff(&swapped, &fx["uld_swapped_t1"]) < 1e-12);
}

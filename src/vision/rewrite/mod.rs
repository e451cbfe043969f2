//! Graph rewrites before tract optimises the encoder: the linear layers to this project's
//! kernel where it pays ([`products`]), and unit gathers to reshapes.

pub mod products;

pub use products::take_products;

use tract_onnx::prelude::*;

/// Replace each gather of index 0 along an axis of length 1 (how an exported tower drops its
/// batch axis) by the removal of that axis, which leaves the values where they are instead of
/// copying them (ViT-L's projector output: 9 MB).
pub(super) fn unit_gathers_to_reshapes(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::array::Gather;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(gather) = node.op_as::<Gather>() else {
            continue;
        };
        let [data, index] = node.inputs[..] else {
            continue;
        };
        let unit = model.outlet_fact(data)?.shape.get(gather.axis) == Some(&1.to_dim());
        let zero = model.outlet_fact(index)?.konst.as_ref().is_some_and(|i| {
            i.rank() == 0 && i.cast_to_scalar::<i64>().is_ok_and(|i| i == 0 || i == -1)
        });
        if !(unit && zero && gather.output_type.is_none()) {
            continue;
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(model, data)?;
        let out = patch.wire_node(&name, AxisOp::Rm(gather.axis), &[input])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gather_of_a_unit_axis_becomes_its_removal_and_other_gathers_stay() {
        use tract_onnx::tract_core::ops::array::Gather;
        // (data shape, axis, index, replaced)
        let cases: &[(&[usize], usize, i64, bool)] = &[
            (&[1, 5, 3], 0, 0, true),
            (&[5, 1, 3], 1, -1, true),
            (&[2, 5, 3], 0, 1, false),
            (&[2, 5, 3], 0, 0, false),
        ];
        for &(shape, axis, index, replaced) in cases {
            let what = format!("{shape:?}, axis {axis}, index {index}");
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact(shape)).unwrap();
            let i = model.add_const("i", tensor0(index)).unwrap();
            let y = model
                .wire_node("gather", Gather::new(axis), &[x, i])
                .unwrap();
            model.select_output_outlets(&y).unwrap();
            let mut ours = model.clone();
            let n = unit_gathers_to_reshapes(&mut ours).unwrap();
            assert_eq!(n, replaced as usize, "{what}");
            let len = shape.iter().product();
            let values: Vec<f32> = (0..len).map(|v| v as f32 * 0.5 - 3.0).collect();
            let x = Tensor::from_shape(shape, &values).unwrap();
            let run = |m: TypedModel| {
                let plan = m.into_optimized().unwrap().into_runnable().unwrap();
                plan.run(tvec!(x.clone().into_tvalue())).unwrap().remove(0)
            };
            let (want, got) = (run(model), run(ours));
            assert_eq!(got.shape(), want.shape(), "{what}");
            assert_eq!(
                got.to_plain_array_view::<f32>().unwrap(),
                want.to_plain_array_view::<f32>().unwrap(),
                "{what}"
            );
        }
    }
}

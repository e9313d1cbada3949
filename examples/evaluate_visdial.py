"""
Evaluate a vision-language model on Visual Dialog v1.0: rank the 100 candidate answers of every round by their
log-likelihood, then report NDCG, MRR and R@1/5/10 (the `omnifusion-evaluate-visdial` command; same flags).

    python examples/evaluate_visdial.py --model path/to/omnifusion --visdial_json visdial_1.0_val.json \
        --dense_json visdial_1.0_val_dense_annotations.json --images_dir VisualDialog_val2018 \
        --output omnifusion_visdial.json --name OmniFusion

    # the same on vLLM (prefix caching; several GPUs with --tensor_parallel_size), identical rankings
    python examples/evaluate_visdial.py --backend vllm --tensor_parallel_size 2 --model path/to/omnifusion ...

    # compare result files in a table and a bar chart
    python examples/evaluate_visdial.py --plot omnifusion_visdial.json llava_visdial.json --plot_output visdial.png

All flags: `python examples/evaluate_visdial.py --help`; the code is `modeling_omnifusion.evaluation.visdial`.
"""

from modeling_omnifusion.evaluation.visdial import main

if __name__ == "__main__":
    raise SystemExit(main())

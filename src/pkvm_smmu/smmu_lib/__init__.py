"""SMMUv3 driver code that both the host kernel and the hyp run (the series' ``arm-smmu-v3-lib``,
patch 06, and v8's "Move hitless machinery to common code").

Pure functions over ``arch`` encodings: no hardware, no host or hyp state. Each side runs its own
copy with its own memory writer, exactly as the kernel and EL2 each compile the shared C file.
"""

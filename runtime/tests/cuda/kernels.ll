; Test kernels for runtime/tests/cuda.rs, in LLVM IR for the NVPTX backend.
; Regenerate the PTX next to it with:
;   llc-22 -march=nvptx64 -mcpu=sm_80 -O2 kernels.ll -o kernels.ptx
; Every kernel takes its buffers as global pointers, then its scalars as
; i64, as the runtime launches them.

target datalayout = "e-p6:32:32-i64:64-i128:128-i256:256-v16:16-v32:32-n16:32:64"
target triple = "nvptx64-nvidia-cuda"

declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ntid.x()

define internal i64 @gid() #0 {
  %tid = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %cta = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %ntid = call i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
  %c = zext i32 %cta to i64
  %n = zext i32 %ntid to i64
  %t = zext i32 %tid to i64
  %b = mul i64 %c, %n
  %i = add i64 %b, %t
  ret i64 %i
}

; out[i] = a[i] + b[i] for i < n
define ptx_kernel void @smelt_test_add(ptr addrspace(1) %a, ptr addrspace(1) %b, ptr addrspace(1) %out, i64 %n) {
entry:
  %i = call i64 @gid()
  %in = icmp slt i64 %i, %n
  br i1 %in, label %body, label %done
body:
  %pa = getelementptr float, ptr addrspace(1) %a, i64 %i
  %pb = getelementptr float, ptr addrspace(1) %b, i64 %i
  %po = getelementptr float, ptr addrspace(1) %out, i64 %i
  %va = load float, ptr addrspace(1) %pa
  %vb = load float, ptr addrspace(1) %pb
  %s = fadd float %va, %vb
  store float %s, ptr addrspace(1) %po
  br label %done
done:
  ret void
}

; out[i] = (float) ids[i] for i < n
define ptx_kernel void @smelt_test_ids_to_f32(ptr addrspace(1) %ids, ptr addrspace(1) %out, i64 %n) {
entry:
  %i = call i64 @gid()
  %in = icmp slt i64 %i, %n
  br i1 %in, label %body, label %done
body:
  %pi = getelementptr i64, ptr addrspace(1) %ids, i64 %i
  %po = getelementptr float, ptr addrspace(1) %out, i64 %i
  %v = load i64, ptr addrspace(1) %pi
  %f = sitofp i64 %v to float
  store float %f, ptr addrspace(1) %po
  br label %done
done:
  ret void
}

; out[i] = i < past ? past[i] : new[i - past] for i < past + seq
define ptx_kernel void @smelt_test_concat(ptr addrspace(1) %past, ptr addrspace(1) %new, ptr addrspace(1) %out, i64 %np, i64 %ns) {
entry:
  %i = call i64 @gid()
  %total = add i64 %np, %ns
  %in = icmp slt i64 %i, %total
  br i1 %in, label %body, label %done
body:
  %old = icmp slt i64 %i, %np
  br i1 %old, label %frompast, label %fromnew
frompast:
  %pp = getelementptr float, ptr addrspace(1) %past, i64 %i
  %vp = load float, ptr addrspace(1) %pp
  br label %write
fromnew:
  %j = sub i64 %i, %np
  %pn = getelementptr float, ptr addrspace(1) %new, i64 %j
  %vn = load float, ptr addrspace(1) %pn
  br label %write
write:
  %v = phi float [ %vp, %frompast ], [ %vn, %fromnew ]
  %po = getelementptr float, ptr addrspace(1) %out, i64 %i
  store float %v, ptr addrspace(1) %po
  br label %done
done:
  ret void
}

; logits [seq, 10]: row seq-1 is one-hot at (sum of present[0..total]) mod 10, other rows 0
define ptx_kernel void @smelt_test_logits(ptr addrspace(1) %present, ptr addrspace(1) %logits, i64 %total, i64 %ns) {
entry:
  %i = call i64 @gid()
  %n = mul i64 %ns, 10
  %in = icmp slt i64 %i, %n
  br i1 %in, label %loop, label %done
loop:
  %k = phi i64 [ 0, %entry ], [ %k1, %step ]
  %acc = phi float [ 0.0, %entry ], [ %acc1, %step ]
  %more = icmp slt i64 %k, %total
  br i1 %more, label %step, label %body
step:
  %pk = getelementptr float, ptr addrspace(1) %present, i64 %k
  %vk = load float, ptr addrspace(1) %pk
  %acc1 = fadd float %acc, %vk
  %k1 = add i64 %k, 1
  br label %loop
body:
  %s = sdiv i64 %i, 10
  %v = srem i64 %i, 10
  %sum = fptosi float %acc to i64
  %tok = srem i64 %sum, 10
  %last = sub i64 %ns, 1
  %isrow = icmp eq i64 %s, %last
  %istok = icmp eq i64 %v, %tok
  %hot = and i1 %isrow, %istok
  %val = select i1 %hot, float 1.0, float 0.0
  %po = getelementptr float, ptr addrspace(1) %logits, i64 %i
  store float %val, ptr addrspace(1) %po
  br label %done
done:
  ret void
}

!nvvm.annotations = !{!0, !1, !2, !3}
!0 = !{ptr @smelt_test_add, !"kernel", i32 1}
!1 = !{ptr @smelt_test_ids_to_f32, !"kernel", i32 1}
!2 = !{ptr @smelt_test_concat, !"kernel", i32 1}
!3 = !{ptr @smelt_test_logits, !"kernel", i32 1}

attributes #0 = { alwaysinline }

# Sourced by the GPU experiment scripts: carry the tiny editor's fits from one machine to the next.
# A fresh machine spends ~3.5 min refitting the tiny VAE and editor (H200); the fits are
# deterministic per kernel family and cached by a key that names it, so a fit brought from an
# earlier call on the same GPU kind and torch is the very file this machine would write, and one
# from anywhere else is simply not found (refitted). pack_fits OUT leaves each fit folder as
# OUT/fits-<kind>.tar.xz (each under the 16 MiB a returned file may have); FITS=DIR unpacks them.
unpack_fits() {  # into $AOT_CACHE, from $FITS (a folder of fits-*.tar.xz), if set
  [ -n "${FITS:-}" ] || return 0
  for f in "$FITS"/fits-*.tar.xz; do [ -e "$f" ] && tar -xJf "$f" -C "$AOT_CACHE" && echo "fits from $f"; done
  return 0
}
pack_fits() {  # OUT
  for kind in tiny-vae tiny-editor; do
    [ -d "$AOT_CACHE/$kind" ] && tar -cJf "$1/fits-$kind.tar.xz" -C "$AOT_CACHE" "$kind"
  done
  return 0
}

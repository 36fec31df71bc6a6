# Reads include/msbnb/kernels/isa.def (THE ISA list) and builds one object library per ISA from
# the sources in its folder, compiled with that row's flags.
function(msbnb_add_isa_objects out_var)
  file(READ "${PROJECT_SOURCE_DIR}/include/msbnb/kernels/isa.def" isa_def)
  string(REGEX MATCHALL "\nMSBNB_ISA\\([^\n]*\\)" rows "${isa_def}")
  set(objects)
  foreach(row IN LISTS rows)
    string(REGEX MATCH "MSBNB_ISA\\(([a-z0-9_]+), *([^,]+), *\"([^\"]*)\", *\"([^\"]*)\"\\)" _ "${row}")
    set(id "${CMAKE_MATCH_1}")
    string(STRIP "${CMAKE_MATCH_2}" folder)
    separate_arguments(flags UNIX_COMMAND "${CMAKE_MATCH_4}")
    file(GLOB srcs CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/src/kernels/${folder}/*.cpp")
    add_library(msbnb_kernels_${id} OBJECT ${srcs})
    target_compile_options(msbnb_kernels_${id} PRIVATE ${flags})
    # GCC 12 warns inside its own avx512fintrin.h (_mm512_undefined_*, GCC bug 105593).
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      target_compile_options(msbnb_kernels_${id} PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
      # The decode loops run at +-25 % depending on where they land (measured with the bench's
      # dequantize_tile); 64-byte loop alignment makes that placement fixed.
      target_compile_options(msbnb_kernels_${id} PRIVATE -falign-loops=64)
    endif()
    target_include_directories(msbnb_kernels_${id} PRIVATE ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/src)
    set_target_properties(msbnb_kernels_${id} PROPERTIES POSITION_INDEPENDENT_CODE ON)
    target_link_libraries(msbnb_kernels_${id} PRIVATE OpenMP::OpenMP_CXX msbnb_warnings)
    list(APPEND objects $<TARGET_OBJECTS:msbnb_kernels_${id}>)
  endforeach()
  set(${out_var} ${objects} PARENT_SCOPE)
endfunction()

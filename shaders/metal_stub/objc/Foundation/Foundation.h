// Foundation.h — a stub of the Foundation declarations the Metal driver
// (csrc/backends/metal/metal_backend.m) uses, for an Objective-C syntax check on
// machines without the macOS SDK: clang -x objective-c -fsyntax-only -fblocks
// -I shaders/metal_stub/objc. Declarations only, written from the names and
// signatures of Apple's public API; they say nothing about what the real framework
// does, only that the driver calls it with the right names, types and arity.
#ifndef MF_STUB_FOUNDATION_H
#define MF_STUB_FOUNDATION_H

#include <stdint.h>

typedef signed char BOOL;
#define YES ((BOOL)1)
#define NO ((BOOL)0)
#ifndef nil
#define nil ((id)0)
#endif

typedef long NSInteger;
typedef unsigned long NSUInteger;

typedef struct _NSRange {
    NSUInteger location;
    NSUInteger length;
} NSRange;

static inline NSRange NSMakeRange(NSUInteger loc, NSUInteger len) {
    NSRange r;
    r.location = loc;
    r.length = len;
    return r;
}

@protocol NSObject
- (instancetype)retain;
- (oneway void)release;
- (instancetype)autorelease;
- (BOOL)respondsToSelector:(SEL)aSelector;
@end

@interface NSObject <NSObject>
+ (instancetype)alloc;
+ (instancetype)new;
- (instancetype)init;
@end

@interface NSString : NSObject
+ (instancetype)stringWithUTF8String:(const char *)nullTerminatedCString;
- (instancetype)initWithUTF8String:(const char *)nullTerminatedCString;
@property(readonly) const char *UTF8String;
@end

@interface NSError : NSObject
@property(readonly, copy) NSString *localizedDescription;
@end

#endif
